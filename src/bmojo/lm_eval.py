"""lm-evaluation-harness adapter: the model class ``bmojo`` for ``lm_eval`` 0.4 (``pip install "bmojo[eval]"``).

Importing this module registers it. lm-eval 0.4 finds models outside its source tree only once they are
imported, so run the harness through ``python -m bmojo.lm_eval`` (or the ``bmojo-lm-eval`` script), which takes
the ``lm_eval`` command line unchanged::

    python -m bmojo.lm_eval --model bmojo --model_args pretrained=runs/lm/final --tasks lambada_openai

or, in Python, ``import bmojo.lm_eval`` then ``lm_eval.simple_evaluate(model="bmojo", ...)``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lm_eval.models  # noqa: F401  (registers the harness's own models before ours)
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"bmojo.lm_eval needs lm-eval 0.4: pip install 'bmojo[eval]' ({e})") from e

from bmojo.data import Tokenizer, load_tokenizer
from bmojo.evaluate import perplexity
from bmojo.models import BMojoForCausalLM
from bmojo.models.modeling import left_padded, new_tokens


@register_model("bmojo")
class BMojoLM(TemplateLM):
    """A saved ``BMojoForCausalLM`` and its tokenizer, scored with full (uncached) forward passes.

    ``pretrained``: the model folder; ``tokenizer``: ``byte`` or a path (default: the model folder's);
    ``device``: a torch device (default: CUDA when available, else the CPU; a CUDA device asked for where there
    is none falls back to the CPU with a warning, as the harness asks for ``cuda`` by default);
    ``max_length``: the longest context fed to the model (longer inputs keep their last tokens);
    ``batch_size``: inputs per forward pass or ``generate`` call, padded on the left (``auto`` means 1);
    ``max_batch_size`` is passed by the harness and unused.
    """

    def __init__(
        self,
        pretrained: str | BMojoForCausalLM,
        tokenizer: str | Tokenizer | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if device is None or str(device).startswith("cuda") and not torch.cuda.is_available():
            if device is not None:
                logging.getLogger(__name__).warning("device %s is not available; using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if isinstance(pretrained, BMojoForCausalLM):
            if tokenizer is None:
                raise ValueError("pass the tokenizer with a model object")
            self.model = pretrained
        else:
            self.model = BMojoForCausalLM.from_pretrained(pretrained)
        self.model.to(self._device).eval()
        self.tok = load_tokenizer(tokenizer if tokenizer is not None else pretrained)
        if self.tok.eos_id is None:
            raise ValueError(f"tokenizer {self.tok.name} has no end-of-text token, which lm-eval needs")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), whether greedy decoding gives the continuation)`` per request;
        ``batch_size`` requests of similar lengths share a forward pass, padded on the left (so that every row's
        continuation ends at the last position)."""
        inputs = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("empty continuation")
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs.append((whole[:-1], whole[-len(continuation) :]))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            group = order[start : start + self.batch_size]
            ids, mask = left_padded([inputs[i][0] for i in group], self.eot_token_id, self._device)
            keep = max(len(inputs[i][1]) for i in group)
            logits = self.model(ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(group):
                target = torch.tensor(inputs[i][1], device=self._device)
                lp = logprobs[row, -len(target) :]
                score = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (eot prepended), over non-overlapping ``max_length`` windows."""
        out = []
        for req in requests:
            (text,) = req.args
            tokens = [self.eot_token_id, *self.tok_encode(text)]
            result = perplexity(self.model, torch.tensor(tokens), self.max_length, self.batch_size)
            score = -result["loss"] * result["tokens"]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
            out.append(score)
        return out

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with ``do_sample``, sampled) continuation of each context, cut at the first ``until`` string;
        ``batch_size`` contexts with the same generation settings share a ``generate`` call, padded on the left."""
        groups: dict[str, tuple[dict[str, Any], list[tuple[int, list[int], list[str]]]]] = {}  # settings, requests
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok.decode([self.eot_token_id]) or "\n\n"]
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            sampling = {k: kwargs[k] for k in ("temperature", "top_k", "top_p") if k in kwargs} if do_sample else {}
            settings = dict(max_new_tokens=max_new, do_sample=do_sample, **sampling)
            ids = ([self.eot_token_id] + self.tok_encode(context))[-self.max_length :]
            members = groups.setdefault(repr(sorted(settings.items())), (settings, []))[1]
            members.append((index, ids, [until] if isinstance(until, str) else list(until)))
        out = [""] * len(requests)
        for settings, members in groups.values():
            members.sort(key=lambda member: -len(member[1]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                ids, mask = left_padded([member[1] for member in batch], self.eot_token_id, self._device)
                generated = self.model.generate(ids, attention_mask=mask, eos_token_id=self.eot_token_id,
                                                pad_token_id=self.eot_token_id, **settings)  # fmt: skip
                for (index, _, until), new in zip(batch, new_tokens(generated, ids.shape[1], self.eot_token_id)):
                    text = self.tok.decode(new)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    context, gen_kwargs = requests[index].args
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                    out[index] = text
        return out


def main() -> None:
    """The ``lm_eval`` command line with the ``bmojo`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
