"""Recover a primed model by distillation from the Transformer it was primed from, starting from its weights.

``bmojo train`` builds its student from a config with fresh weights (``model:`` names a preset or a config); it
cannot yet start from a saved model's weights. This script reads the same YAML (``bmojo.train.load_config``) and
runs the same objective, next-token cross-entropy + innovation loss + ``distill_weight * distill_kl`` to the
``teacher``, with AdamW, ``param_groups`` (no decay on embeddings, norms, A_log/D/dt_bias) and the warmup + cosine
schedule, but initialises the student from the folder ``model:`` names. It writes ``out_dir/final`` (model +
tokenizer) and ``out_dir/metrics.jsonl``. From the repository root:

    OMP_NUM_THREADS=1 python examples/prime/recover.py examples/prime/recover.yaml [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bmojo.data import load_corpus, load_tokenizer
from bmojo.models import BMojoForCausalLM
from bmojo.recall import cosine_lr
from bmojo.train import distill_kl, load_config, load_teacher, param_groups, sample_windows


def main(config: str, *overrides: str) -> None:
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.tokenizer)
    corpus = load_corpus(cfg.data, tokenizer=tok, cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction,
                         seed=cfg.seed)  # fmt: skip
    student = BMojoForCausalLM.from_pretrained(cfg.model).train()
    teacher = load_teacher(cfg.teacher, student.config.vocab_size, torch.device("cpu"))
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, cfg.steps, cfg.warmup_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as log:
        for step in range(1, cfg.steps + 1):
            windows = sample_windows(corpus.train, cfg.batch_size, cfg.seq_len, generator)
            result = student(input_ids=windows[:, :-1], use_cache=False)
            ce = F.cross_entropy(result.logits.flatten(0, 1), windows[:, 1:].flatten())
            with torch.no_grad():
                teacher_logits = teacher(input_ids=windows[:, :-1], use_cache=False).logits
            kl = distill_kl(result.logits, teacher_logits, cfg.distill_temperature)
            loss = ce + cfg.distill_weight * kl
            if result.aux_loss is not None:
                loss = loss + student.config.innovation_loss_weight * result.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "ce": ce.item(), "kl": kl.item(), "seconds": time.perf_counter() - start}
                log.write(json.dumps(record) + "\n")
                print(record, flush=True)
    student.eval().save_pretrained(out / "final")
    tok.save(out / "final")
    print(f"model in {out / 'final'} after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
