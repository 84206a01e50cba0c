import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from prunetune.evaluators.model import load_model, random_model, smollm2_gguf, tiny_config


def save_with_tokenizer(model: torch.nn.Module, path) -> None:
    model.save_pretrained(path)
    from tokenizers import Tokenizer, models
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.save_pretrained(path)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_load_from_local_directory_offline(tmp_path, monkeypatch, model_type: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = random_model(tiny_config(model_type))
    save_with_tokenizer(original, tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert not model.training and tokenizer is not None


def test_unsupported_architecture_names_itself_and_the_supported_ones(tmp_path) -> None:
    config = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=8, vocab_size=16)
    save_with_tokenizer(AutoModelForCausalLM.from_config(config), tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2': prunetune supports llama, mistral, qwen2"):
        load_model(str(tmp_path))


def test_unknown_family_for_tiny_config() -> None:
    with pytest.raises(ValueError, match="unsupported architecture 'bert'"):
        tiny_config("bert")


def test_missing_gguf_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model(str(tmp_path / "nothing.gguf"))


def test_smollm2_loads_from_its_gguf(smollm2_loaded) -> None:
    model, tokenizer = smollm2_loaded
    assert smollm2_gguf().suffix == ".gguf"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)
