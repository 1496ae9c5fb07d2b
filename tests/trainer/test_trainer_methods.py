"""Every adaptation method trains the default model, saves, reloads and generates; bad methods fail clearly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from schemas.training import METHODS, Hyperparameters, PeftSettings
from services.trainer.loop import TrainingRun
from services.trainer.methods import (INVALID_CONFIG, UNAVAILABLE, UNSUPPORTED, MethodError, build_model,
                                      load_for_inference, peft_config, save_result)

pytestmark = pytest.mark.slow

SENTENCES = ["The cat sat on the mat.", "Paris is the capital of France.", "Two plus two is four.",
             "Rivers flow down to the sea."]
TINY = Hyperparameters(batch_size=2, max_steps=2, max_seq_length=32, learning_rate=1e-3)


@dataclass
class Example:
    """A tokenized example, as the dataset module yields them."""

    input_ids: list[int]
    labels: list[int]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    """The default model's tokenizer."""
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    """Short sentences, every token trained."""
    return [Example(ids, list(ids)) for ids in (tokenizer(s)["input_ids"] for s in SENTENCES)]


def _train(model, tokenizer, examples, tmp_path: Path, hp: Hyperparameters = TINY):
    losses: list[float] = []
    run = TrainingRun(model, tokenizer.pad_token_id, examples, hp, seed=1, work_dir=tmp_path / "work")
    result = run.run(lambda m: losses.append(m.loss), lambda: False, lambda step, d: None)
    return result, losses


@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])
def test_method_trains_saves_reloads_and_generates(method, default_model_dir, tokenizer, examples, tmp_path):
    model, info = build_model(default_model_dir, PeftSettings(method=method), total_steps=TINY.max_steps)
    assert 0 < info.trainable_params <= info.total_params
    if method != "full":
        assert info.trainable_params < info.total_params / 10
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.no_grad():
        untrained_logits = model(**prompt).logits

    result, losses = _train(model, tokenizer, examples, tmp_path)
    assert result.status == "succeeded" and result.steps == 2
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # Training changed the model: its trainable weights moved, and so did what it predicts.
    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert changed, f"{method}: no trainable weight changed"

    out = save_result(model, tmp_path / "result")
    expected = "model.safetensors" if method == "full" else "adapter_config.json"
    assert (out / expected).exists()
    model.eval()
    with torch.no_grad():
        trained_logits = model(**prompt).logits
    assert (trained_logits - untrained_logits).abs().max() > 1e-3, f"{method}: the trained model predicts as before"
    reloaded = load_for_inference(default_model_dir, out)
    with torch.no_grad():
        reloaded_logits = reloaded(**prompt).logits
    # The saved result is the trained model (PiSSA: converted to a plain LoRA on the original base).
    torch.testing.assert_close(reloaded_logits, trained_logits, atol=2e-3, rtol=1e-3)
    generated = reloaded.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_adalora_reallocates_ranks_in_a_short_job(default_model_dir, tokenizer, examples, tmp_path):
    settings = PeftSettings(method="adalora", r=4)
    model, _ = build_model(default_model_dir, settings, total_steps=TINY.max_steps)
    config = model.peft_config["default"]
    assert config.init_r > config.target_r == 4 and config.rank_pattern is None

    _train(model, tokenizer, examples, tmp_path)

    pattern = config.rank_pattern
    assert pattern, "update_and_allocate never produced a rank pattern"
    kept = sum(sum(mask) for mask in pattern.values())
    # The final budget: target_r ranks per adapted module on average, fewer than were initialised.
    assert kept == config.target_r * len(pattern) < config.init_r * len(pattern)
    assert len({sum(mask) for mask in pattern.values()}) > 1, "ranks were not redistributed across modules"

    # The saved adapter keeps only the allocated ranks and still reproduces the trained model.
    prompt = tokenizer("Rivers flow", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        trained_logits = model(**prompt).logits
    reloaded = load_for_inference(default_model_dir, save_result(model, tmp_path / "result"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**prompt).logits, trained_logits, atol=2e-3, rtol=1e-3)


def test_lora_family_respects_target_modules_and_options(default_model_dir):
    settings = PeftSettings(method="dora", target_modules=["q_proj", "v_proj"], options={"use_rslora": True})
    model, info = build_model(default_model_dir, settings, total_steps=1)
    assert info.target_modules == ["q_proj", "v_proj"] and info.peft_type == "LORA"
    assert model.peft_config["default"].use_dora and model.peft_config["default"].use_rslora


def test_prompt_tuning_can_start_from_text(default_model_dir, tokenizer):
    text = "Answer briefly:"
    settings = PeftSettings(method="prompt_tuning", options={"prompt_tuning_init_text": text})
    model, info = build_model(default_model_dir, settings, total_steps=1)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    virtual = model.prompt_encoder["default"].embedding.weight
    assert virtual.shape[0] == 8 and info.trainable_params == virtual.numel()
    words = model.get_input_embeddings().weight[torch.tensor(ids)]
    torch.testing.assert_close(virtual[:len(ids)], words)


def test_qlora_on_cpu_is_unavailable(default_model_dir):
    with pytest.raises(MethodError) as err:
        build_model(default_model_dir, PeftSettings(method="qlora"), total_steps=2)
    assert err.value.code == UNAVAILABLE
    assert "CUDA" in err.value.message and "lora" in err.value.message


@pytest.mark.parametrize("name, hint", [("nope", "known methods: lora"), ("adaliprompt", "adalora"),
                                        ("HyenaDNA", "DNA model architecture")])
def test_unknown_methods_are_rejected_with_a_reason(name, hint):
    with pytest.raises(MethodError) as err:
        peft_config(PeftSettings(method=name), total_steps=10)
    assert err.value.code == UNSUPPORTED and hint in err.value.message


def test_unknown_option_names_the_keyword_and_method():
    with pytest.raises(MethodError) as err:
        peft_config(PeftSettings(method="ia3", options={"num_virtual_tokens": 4}), total_steps=10)
    assert err.value.code == INVALID_CONFIG
    assert "'num_virtual_tokens'" in err.value.message and "'ia3'" in err.value.message


def test_trainer_owned_fields_cannot_be_overridden():
    with pytest.raises(MethodError) as err:
        peft_config(PeftSettings(method="adalora", options={"total_step": 3}), total_steps=10)
    assert err.value.code == INVALID_CONFIG and "'total_step'" in err.value.message


def test_full_fine_tuning_takes_no_options(default_model_dir):
    with pytest.raises(MethodError) as err:
        build_model(default_model_dir, PeftSettings(method="full", options={"r": 4}), total_steps=1)
    assert err.value.code == INVALID_CONFIG and "'r'" in err.value.message


def test_invalid_values_become_method_errors():
    with pytest.raises(MethodError) as err:
        peft_config(PeftSettings(method="adalora", options={"tinit": 50}), total_steps=10)
    assert err.value.code == INVALID_CONFIG and err.value.message.startswith("adalora:")


def test_options_reach_the_peft_config():
    config = peft_config(PeftSettings(method="prompt_tuning",
                                      options={"num_virtual_tokens": 4, "prompt_tuning_init_text": "Answer:"}),
                         total_steps=5, base_path="/models/base")
    assert config.num_virtual_tokens == 4 and config.prompt_tuning_init == "TEXT"
    assert config.tokenizer_name_or_path == "/models/base"
    adalora = peft_config(PeftSettings(method="adalora"), total_steps=100)
    assert (adalora.tinit, adalora.tfinal, adalora.total_step) == (10, 20, 100)


def test_unknown_target_module_is_a_config_error(default_model_dir):
    with pytest.raises(MethodError) as err:
        build_model(default_model_dir, PeftSettings(method="lora", target_modules=["qkv"]), total_steps=1)
    assert err.value.code == INVALID_CONFIG and "qkv" in err.value.message
