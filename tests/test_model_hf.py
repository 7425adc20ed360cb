"""Local transformers directories: loading model and tokenizer, mixed precision with float32
master weights, gradient checkpointing, LoRA, export, and the pre-flight directory check."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedgspo.distributed import FlatGradients
from fedgspo.gspo.model import (
    LoraSettings,
    ModelConfig,
    ModelError,
    autocast,
    build_model,
    check_model_dir,
    export_pretrained,
    load_policy,
    load_tokenizer,
    trainable_numel,
    weights_sha256,
)
from hf_fixtures import CHAT_TEMPLATE, make_model_dir, make_tokenizer

HIDDEN, LAYERS, R = 32, 2, 4
LORA = LoraSettings(r=R, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("hf") / "tiny", hidden=HIDDEN, layers=LAYERS)


def _ids(tok) -> torch.Tensor:
    text = tok.apply_chat_template([{"role": "user", "content": "what is 2 + 3"}], tokenize=False,
                                   add_generation_prompt=True)
    return torch.tensor([tok.encode(text)])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def test_load_policy_reads_model_and_tokenizer(model_dir: Path) -> None:
    model, tok = load_policy(ModelConfig(path=model_dir), seed=0)
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    assert tok.chat_template == CHAT_TEMPLATE
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    ids = _ids(tok)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path) -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "</s>" and loaded.padding_side == "left"


def test_options_pass_through(model_dir: Path) -> None:
    model, _ = load_policy(ModelConfig(path=model_dir, attn_implementation="eager", gradient_checkpointing=True),
                           seed=0)
    assert model.config._attn_implementation == "eager"
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    with pytest.raises(ModelError, match="vocabulary"):
        build_model(ModelConfig(path=model_dir), 10_000, pad_id=0, bos_id=1, eos_id=2, seed=0)
    with pytest.raises(Exception):
        LoraSettings(rank=4)  # unknown key


def _grads(model, ids: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_gradient_checkpointing_gives_the_same_gradient(model_dir: Path) -> None:
    plain, tok = load_policy(ModelConfig(path=model_dir), seed=0)
    ckpt, _ = load_policy(ModelConfig(path=model_dir, gradient_checkpointing=True), seed=0)
    for a, b in zip(_grads(plain, _ids(tok)), _grads(ckpt, _ids(tok))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bf16_autocast_keeps_fp32_master_weights(model_dir: Path) -> None:
    cfg = ModelConfig(path=model_dir, dtype="bfloat16")
    model, tok = load_policy(cfg, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert isinstance(autocast(ModelConfig(), "cpu"), contextlib.nullcontext)
    with autocast(ModelConfig(), "cpu"):
        assert model(input_ids=_ids(tok)).logits.dtype == torch.float32
    with autocast(cfg, "cpu"):
        logits = model(input_ids=_ids(tok)).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), _logits(model, _ids(tok)), rtol=0, atol=0.1)
    logits.float().logsumexp(-1).mean().backward()
    grads = FlatGradients(list(model.parameters()))  # one dtype: accepted
    assert grads.buffer.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_lora_trains_only_float32_adapters(model_dir: Path) -> None:
    model, tok = load_policy(ModelConfig(path=model_dir, dtype="bfloat16", lora=LORA), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_lora_params(model)) and trainable
    assert {p.dtype for n, p in model.named_parameters() if n in trainable} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if n not in trainable} == {torch.bfloat16}
    # q_proj and v_proj (both H x H here) per layer: A (r, H) + B (H, r)
    assert trainable_numel(model) == LAYERS * 2 * 2 * R * HIDDEN
    grads = FlatGradients(list(model.parameters()))
    assert grads.buffer.numel() == trainable_numel(model)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(input_ids=_ids(tok)).logits.float().logsumexp(-1).mean().backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_lora_is_seeded(model_dir: Path) -> None:
    cfg = ModelConfig(path=model_dir, lora=LORA)
    a, b, c = (load_policy(cfg, seed=s)[0] for s in (3, 3, 4))
    assert weights_sha256(a) == weights_sha256(b) != weights_sha256(c)


def _trained_lora(model_dir: Path):
    model, tok = load_policy(ModelConfig(path=model_dir, lora=LORA), seed=0)
    with torch.no_grad():
        for name, p in _lora_params(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # as after some training: the adapters now change the output
    return model, tok


def test_export_merged_loads_with_from_pretrained(model_dir: Path, tmp_path: Path) -> None:
    model, tok = _trained_lora(model_dir)
    before = weights_sha256(model)
    out = export_pretrained(model, tok, tmp_path / "export", merge_lora=True)
    assert weights_sha256(model) == before and _lora_params(model)  # training model untouched
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    loaded_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    ids = _ids(loaded_tok)
    model.eval()
    assert not torch.allclose(_logits(model, ids), _logits(AutoModelForCausalLM.from_pretrained(model_dir), ids),
                              atol=1e-3)
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids), rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left


def test_export_adapter_loads_with_peft_and_replaces(model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model, tok = _trained_lora(model_dir)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    export_pretrained(model, tok, out, merge_lora=False)
    assert (out / "adapter_config.json").is_file() and not (out / "stale.txt").exists()
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    loaded = PeftModel.from_pretrained(base, out).eval()
    model.eval()
    ids = _ids(tok)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).chat_template == CHAT_TEMPLATE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_export_full_model(model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_policy(ModelConfig(path=model_dir), seed=0)
    out = export_pretrained(model, tok, tmp_path / "full", merge_lora=True)
    ids = _ids(tok)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(model, ids),
                               rtol=0, atol=0)


def test_check_model_dir_errors_are_one_line(model_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    check_model_dir(model_dir, lora=True)
    cases = {tmp_path / "missing": "is not a directory", tmp_path: "has no config.json"}
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    cases[bare] = "has no tokenizer (tokenizer.json / tokenizer_config.json)"
    for path, message in cases.items():
        with pytest.raises(ModelError) as err:
            check_model_dir(path)
        assert str(err.value) == f"model.path: {path} {message}"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    check_model_dir(model_dir)
    with pytest.raises(ModelError) as err:
        check_model_dir(model_dir, lora=True)
    assert str(err.value).startswith("model.lora: ") and "\n" not in str(err.value)
    with pytest.raises(ModelError, match="model.path: not set"):
        load_policy(ModelConfig(), seed=0)
