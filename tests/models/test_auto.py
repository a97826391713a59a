"""`import bmojo` registers model_type "bmojo" with transformers' Auto classes and pipelines (no remote code)."""

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

from bmojo import BMojoConfig, BMojoForCausalLM, BMojoModel


def saved_model(path, name: str = "bmojo") -> BMojoForCausalLM:
    torch.manual_seed(0)
    model = BMojoForCausalLM(BMojoConfig.from_preset(name, "tiny", window_size=8, chunk_size=4, eidetic_size=2)).eval()
    with torch.no_grad():  # larger weights than the initialisation, so greedy decoding does not repeat one token
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Whitespace-split words ``w0 .. w{V-2}`` plus ``<unk>`` (id ``V-1``), also used as eos and pad."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<unk>", pad_token="<unk>")


def test_auto_classes_load_a_saved_bmojo_model(tmp_path):
    model = saved_model(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is BMojoConfig
    ids = torch.randint(0, 128, (2, 30))
    causal = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(causal) is BMojoForCausalLM and type(base) is BMojoModel
    with torch.no_grad():
        assert torch.equal(causal(ids).logits, model(ids).logits)
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_text_generation_pipeline_runs_a_saved_bmojo_model(tmp_path):
    model = saved_model(tmp_path, "jamba")
    tokenizer = word_tokenizer(model.config.vocab_size)
    tokenizer.save_pretrained(tmp_path)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path))
    assert type(pipe.model) is BMojoForCausalLM
    prompt = "w3 w17 w5 w99 w3"
    out = pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("pipeline:", out)
    assert out.split() == tokenizer.convert_ids_to_tokens(expected[0, ids.shape[1] :].tolist())
