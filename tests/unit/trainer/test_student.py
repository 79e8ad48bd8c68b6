"""The student model: loading, FVT tokenizer transfer, untying, LoRA, layer truncation, saving.

Real tiny models and tokenizers (tests/factories.py), real ``peft``; nothing is mocked.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.trainer.fvt import FvtPlan, apply_fvt, fvt_plan
from alm_pipeline.trainer.model_surgery import last_layer_parameters, transformer_layers
from alm_pipeline.trainer.student import StudentConfig, load_student, save_student
from tests import factories

TEXT = "The quick brown fox, naïve café 中文 👍"


def _source(path):
    model = AutoModelForCausalLM.from_pretrained(str(path))
    return model, load_byte_view(path)


def _in_out(model):
    return (
        model.get_input_embeddings().weight.detach().clone(),
        model.get_output_embeddings().weight.detach().clone(),
    )


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor([ids])).logits


def _non_special_mean(matrix, view):
    ids = np.flatnonzero(~view.is_special[: matrix.shape[0]])
    return matrix[torch.as_tensor(ids)].float().mean(0)


def _perturb_trainable(model, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def peft_installed():
    return pytest.importorskip("peft")


# ------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"model": "a", "init_from": "b", "tokenizer": "bytes"},
        {"init_from": "b"},
        {"model": "a", "tokenizer": "bytes"},
        {"model": "a", "num_layers": 0},
        {"model": "a", "lora_rank": 0},
        {"model": "a", "lora_alpha": float("nan")},
        {"model": "a", "dtype": "fp8"},
        {"model": "a", "lora_target_modules": "q_proj"},
    ],
)
def test_config_rejects_inconsistent_settings(kwargs):
    with pytest.raises(ValueError):
        StudentConfig(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# FVT


def test_identity_transfer_copies_every_row_and_keeps_the_model(gpt2_bl_model):
    """Transferring a model to its own tokenizer changes nothing: every row is an exact copy."""
    source, _ = _source(gpt2_bl_model)
    bundle = load_student(StudentConfig(init_from=str(gpt2_bl_model), tokenizer=str(gpt2_bl_model)))
    counts = bundle.info.fvt
    assert counts["exact"] + counts["special"] == bundle.view.vocab_size
    assert counts["multi_token"] == counts["fallback"] == counts["special_mean"] == 0
    assert torch.equal(_in_out(bundle.model)[0], _in_out(source)[0])
    ids = bundle.view.encode(TEXT).token_ids.tolist()
    torch.testing.assert_close(_logits(bundle.model, ids), _logits(source, ids), rtol=0, atol=0)


def test_identical_tokens_get_the_exact_old_rows_input_and_output(llama_sp_model, tokenizer_dirs):
    """SentencePiece Llama (untied) -> byte-level BPE: shared tokens copy the old input AND output rows."""
    source, src_view = _source(llama_sp_model)
    src_in, src_out = _in_out(source)
    bundle = load_student(
        StudentConfig(init_from=str(llama_sp_model), tokenizer=str(tokenizer_dirs["byte_level"]))
    )
    new_in, new_out = _in_out(bundle.model)
    view = bundle.view
    plan = fvt_plan(src_view, view)
    normal_bytes = {
        b
        for i, b in enumerate(src_view.token_bytes)
        if b and not src_view.is_special[i] and not src_view.tokenizer.id_to_token(i).startswith("<0x")
    }
    checked = 0
    for j, b in enumerate(view.token_bytes):
        if plan.kinds[j] != "exact":
            continue
        (i,) = plan.sources[j]
        assert src_view.token_bytes[i] == b
        assert torch.equal(new_in[j], src_in[i]) and torch.equal(new_out[j], src_out[i])
        # a normal piece wins over its <0xNN> byte-fallback twin
        assert not src_view.tokenizer.id_to_token(i).startswith("<0x") or b not in normal_bytes
        checked += 1
    assert checked == bundle.info.fvt["exact"] > 300
    # ▁the (SentencePiece) and Ġthe (byte-level) are the same bytes
    j = view.tokenizer.token_to_id("Ġthe")
    i = src_view.tokenizer.token_to_id("\u2581the")
    assert torch.equal(new_in[j], src_in[i]) and torch.equal(new_out[j], src_out[i])
    # special token by role: the byte-level <|endoftext|> is BOS and EOS; the source's BOS is <s>
    eot = view.tokenizer.token_to_id("<|endoftext|>")
    assert torch.equal(new_in[eot], src_in[src_view.bos_id])
    # the model config speaks the new tokenizer
    assert bundle.model.config.vocab_size == view.vocab_size == new_in.shape[0] == new_out.shape[0]
    assert bundle.model.config.bos_token_id == view.bos_id and bundle.model.config.eos_token_id == view.eos_id
    assert bundle.model.generation_config.eos_token_id == view.eos_id


def test_sentencepiece_dummy_prefix_is_handled_through_bytes(llama_sp_model, tokenizer_dirs):
    """Every FVT entry covers exactly the new token's bytes: ``The`` is T + he, never the source's ``▁The``."""
    src_view = load_byte_view(llama_sp_model)
    view = load_byte_view(tokenizer_dirs["byte_level"])
    plan = fvt_plan(src_view, view)
    n_multi = 0
    for j, (sources, kind) in enumerate(zip(plan.sources, plan.kinds, strict=True)):
        if kind in ("exact", "multi_token"):
            assert b"".join(src_view.token_bytes[i] for i in sources) == view.token_bytes[j], j
            n_multi += kind == "multi_token"
    assert n_multi > 0
    j = view.tokenizer.token_to_id("The")
    assert plan.kinds[j] == "multi_token"
    assert [src_view.tokenizer.id_to_token(i) for i in plan.sources[j]] == ["T", "he"]
    # the SentencePiece tokenizer itself adds the dummy prefix to this text
    assert src_view.tokenizer.encode("The", add_special_tokens=False).tokens[0].startswith("\u2581")


def test_multi_token_mean_equals_hand_computed_mean(gpt2_bl_model, tokenizer_dirs):
    """Byte-level GPT-2 -> SentencePiece: a piece missing from the source is the mean of the rows of the
    source tokenizer's tokenization of its text."""
    source, _ = _source(gpt2_bl_model)
    src_in = _in_out(source)[0]
    src_tok = AutoTokenizer.from_pretrained(str(gpt2_bl_model))
    bundle = load_student(
        StudentConfig(init_from=str(gpt2_bl_model), tokenizer=str(tokenizer_dirs["sentencepiece"]))
    )
    new_tok = bundle.tokenizer
    checked = 0
    for piece in ["ç", "ö", "ب"]:
        j = new_tok.convert_tokens_to_ids(piece)
        ids = src_tok(piece, add_special_tokens=False)["input_ids"]
        assert len(ids) >= 2
        expected = src_in[torch.as_tensor(ids)].mean(0)
        torch.testing.assert_close(_in_out(bundle.model)[0][j], expected)
        checked += 1
    assert checked == 3
    assert bundle.info.fvt["multi_token"] > 0
    # tied source, not a bytes student: the tying is kept
    assert bundle.info.tied_embeddings
    assert bundle.model.get_output_embeddings().weight is bundle.model.get_input_embeddings().weight


def test_byte_fallback_pieces_map_to_single_bytes(gpt2_bl_model, tokenizer_dirs):
    """<0xNN> pieces (not valid UTF-8 on their own) find the byte-level token of that byte exactly."""
    src_view = load_byte_view(gpt2_bl_model)
    view = load_byte_view(tokenizer_dirs["sentencepiece"])
    plan = fvt_plan(src_view, view)
    for b in range(256):
        j = view.tokenizer.token_to_id(f"<0x{b:02X}>")
        assert plan.kinds[j] == "exact"
        assert src_view.token_bytes[plan.sources[j][0]] == bytes([b])


def test_bytes_student_from_byte_level_teacher(gpt2_bl_model):
    source, src_view = _source(gpt2_bl_model)
    src_in, src_out = _in_out(source)
    bundle = load_student(StudentConfig(init_from=str(gpt2_bl_model), tokenizer="bytes"))
    model, view = bundle.model, bundle.view
    assert view.vocab_size == 259 and bundle.info.fvt == {
        "exact": 256,
        "special": 3,
        "multi_token": 0,
        "special_mean": 0,
        "fallback": 0,
    }
    new_in, new_out = _in_out(model)
    single = {b[0]: i for i, b in enumerate(src_view.token_bytes) if len(b) == 1}
    for b in range(256):
        assert torch.equal(new_in[b], src_in[single[b]])
        assert torch.equal(new_out[b], src_out[single[b]])
    eot = src_view.eos_id  # <|endoftext|>: BOS, EOS, and PAD (the source has no PAD)
    for special in (256, 257, 258):
        assert torch.equal(new_in[special], src_in[eot]) and torch.equal(new_out[special], src_out[eot])
    # untied by default for a bytes student
    assert not bundle.info.tied_embeddings and not model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        256,
        257,
        258,
    )
    assert new_in.dtype == src_in.dtype


def test_untie_with_untied_source_builds_output_rows_by_fvt(llama_sp_model):
    """Source input and output matrices differ: each new matrix is FVT of its own source matrix."""
    source, src_view = _source(llama_sp_model)
    src_in, src_out = _in_out(source)
    assert not torch.equal(src_in, src_out)
    bundle = load_student(
        StudentConfig(init_from=str(llama_sp_model), tokenizer="bytes", untie_embeddings=True)
    )
    new_in, new_out = _in_out(bundle.model)
    a = src_view.tokenizer.token_to_id("a")  # the normal piece, not <0x61>
    assert torch.equal(new_in[ord("a")], src_in[a]) and torch.equal(new_out[ord("a")], src_out[a])
    space = src_view.tokenizer.token_to_id("\u2581")
    assert torch.equal(new_in[ord(" ")], src_in[space]) and torch.equal(new_out[ord(" ")], src_out[space])
    # <pad>: no PAD in the source -> its EOS; <bos>/<eos> -> <s>/</s>
    assert torch.equal(new_out[256], src_out[src_view.eos_id])
    assert torch.equal(new_out[257], src_out[src_view.bos_id])
    assert torch.equal(new_in[258], src_in[src_view.eos_id])


def test_untie_tied_source_and_training_moves_only_one_matrix(gpt2_bl_model, tokenizer_dirs, tmp_path):
    source, src_view = _source(gpt2_bl_model)
    bundle = load_student(
        StudentConfig(
            init_from=str(gpt2_bl_model),
            tokenizer=str(tokenizer_dirs["byte_level_small"]),
            untie_embeddings=True,
        )
    )
    model = bundle.model
    new_in, new_out = _in_out(model)
    assert torch.equal(new_in, new_out)  # both FVT of the same (tied) source matrix
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(_in_out(model)[1], new_out)
    save_student(bundle, tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert not reloaded.config.tie_word_embeddings
    assert torch.equal(_in_out(reloaded)[0], new_in + 1.0)
    assert torch.equal(_in_out(reloaded)[1], new_out)


def test_uncovered_bytes_fall_back_to_the_mean_row(tokenizer_dirs, tmp_path):
    """A char-level source has no single bytes >= 0x80 and no control bytes: those get the mean row."""
    src_path = factories.make_model("llama", tokenizer_dirs["char"], tmp_path / "char_llama")
    source, src_view = _source(src_path)
    src_in, src_out = _in_out(source)
    bundle = load_student(StudentConfig(init_from=str(src_path), tokenizer="bytes"))
    counts = bundle.info.fvt
    assert counts["fallback"] >= 128  # every byte >= 0x80
    assert counts["exact"] + counts["fallback"] == 256
    new_in, new_out = _in_out(bundle.model)
    plan = fvt_plan(src_view, bundle.view)
    assert bundle.info.fvt_fallback_examples == [j for j, k in enumerate(plan.kinds) if k == "fallback"][:20]
    for b in (0x01, 0x80, 0xC3, 0xFF):
        assert plan.kinds[b] == "fallback" and plan.sources[b] == ()
        torch.testing.assert_close(new_in[b], _non_special_mean(src_in, src_view))
        torch.testing.assert_close(new_out[b], _non_special_mean(src_out, src_view))
    # printable ASCII is covered exactly
    assert torch.equal(new_in[ord("x")], src_in[src_view.tokenizer.token_to_id("x")])


def test_apply_fvt_handles_biases_and_keeps_dtype():
    plan = FvtPlan(sources=[(2,), (0, 1), ()], kinds=["exact", "multi_token", "fallback"])
    matrix = torch.arange(12, dtype=torch.bfloat16).reshape(4, 3)
    out = apply_fvt(plan, matrix, mean_ids=[0, 1, 2, 3])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0], matrix[2])
    torch.testing.assert_close(out[1].float(), matrix[:2].float().mean(0))
    torch.testing.assert_close(out[2].float(), matrix.float().mean(0))
    bias = torch.tensor([1.0, 3.0, 5.0, 7.0])
    torch.testing.assert_close(apply_fvt(plan, bias, mean_ids=[0, 1]), torch.tensor([5.0, 2.0, 2.0]))


# ------------------------------------------------------------------------------------------------------------
# existing model, truncation, save / load / generate


def test_existing_model_is_loaded_with_its_own_tokenizer(gpt2_bl_model):
    source, _ = _source(gpt2_bl_model)
    bundle = load_student(StudentConfig(model=str(gpt2_bl_model)))
    assert bundle.info.mode == "model" and bundle.view.vocab_size == 400 and bundle.info.fvt == {}
    ids = bundle.view.encode(TEXT).token_ids.tolist()
    torch.testing.assert_close(_logits(bundle.model, ids), _logits(source, ids), rtol=0, atol=0)
    params = last_layer_parameters(bundle.model)
    assert {id(p) for p in params} == {id(p) for p in bundle.model.transformer.h[-1].parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_num_layers_keeps_the_first_blocks(arch, llama_sp_model, gpt2_bl_model, tmp_path):
    path = llama_sp_model if arch == "llama" else gpt2_bl_model
    full = AutoModelForCausalLM.from_pretrained(str(path))
    bundle = load_student(StudentConfig(model=str(path), num_layers=1))
    model = bundle.model
    layers = transformer_layers(model)
    assert len(layers) == 1 and bundle.info.num_layers == 1 and bundle.info.truncated_from == 2
    assert model.config.num_hidden_layers == 1
    if arch == "gpt2":
        assert model.config.n_layer == 1 and model.transformer.h is layers
    else:
        assert model.model.layers is layers
    # the kept block is the source's first block
    kept = dict(layers[0].named_parameters())
    for name, p in transformer_layers(full)[0].named_parameters():
        assert torch.equal(kept[name], p)
    ids = bundle.view.encode(TEXT).token_ids.tolist()
    assert _logits(model, ids).shape[1] == len(ids)
    save_student(bundle, tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert len(transformer_layers(reloaded)) == 1
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))
    with pytest.raises(ValueError, match="num_layers"):
        load_student(StudentConfig(model=str(path), num_layers=3))


@pytest.mark.parametrize("tokenizer", ["bytes", "byte_level"])
def test_saved_student_loads_and_generates(tokenizer, llama_sp_model, tokenizer_dirs, tmp_path):
    spec = "bytes" if tokenizer == "bytes" else str(tokenizer_dirs[tokenizer])
    bundle = load_student(StudentConfig(init_from=str(llama_sp_model), tokenizer=spec))
    out = save_student(bundle, tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == bundle.view.vocab_size == model.config.vocab_size
    enc = tok(TEXT, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == bundle.view.encode(TEXT).token_ids.tolist()
    torch.testing.assert_close(
        _logits(model, enc["input_ids"][0].tolist()), _logits(bundle.model, enc["input_ids"][0].tolist())
    )
    gen = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 6
    assert int(gen[0, enc["input_ids"].shape[1] :].max()) < len(tok)
    assert isinstance(tok.decode(gen[0]), str)
    info = json.loads((out / "student_info.json").read_text())
    assert info["mode"] == "transfer" and info["vocab_size"] == len(tok)
    if tokenizer == "bytes":  # the saved bytes tokenizer is the built-in one (same fingerprint)
        assert load_byte_view(out).fingerprint == load_byte_view("bytes").fingerprint
    # a saved student can be the `model` of a later run
    again = load_student(StudentConfig(model=str(out)))
    torch.testing.assert_close(
        _logits(again.model, enc["input_ids"][0].tolist()), _logits(model, enc["input_ids"][0].tolist())
    )


# ------------------------------------------------------------------------------------------------------------
# LoRA


def _trainable_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_only_adapters_and_embeddings_train(peft_installed, llama_sp_model):
    bundle = load_student(StudentConfig(init_from=str(llama_sp_model), tokenizer="bytes", lora_rank=8))
    model = bundle.model
    assert bundle.is_lora and bundle.info.lora["rank"] == 8 and bundle.info.lora["alpha"] == 8.0
    names = _trainable_names(model)
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert any("embed_tokens.modules_to_save" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)
    # every linear layer of attention + MLP has an adapter, nothing outside the blocks
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert any(f"layers.1.{proj}.lora_A" in n for n in names)
    for proj in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert any(f"layers.1.{proj}.lora_A" in n for n in names)
    assert not any("norm" in n for n in names)
    assert bundle.info.trainable_parameters < bundle.info.total_parameters
    params = last_layer_parameters(model)
    last_block = {id(p) for p in transformer_layers(model)[-1].parameters()}
    assert params and all(id(p) in last_block for p in params)
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_" in names_by_id[id(p)] and ".layers.1." in names_by_id[id(p)] for p in params)
    # a training step moves adapters, not the frozen base weights
    base_q = transformer_layers(model)[-1].self_attn.q_proj.base_layer.weight.detach().clone()
    loss = model(torch.tensor([[257, 72, 105, 33]]), labels=torch.tensor([[257, 72, 105, 33]])).loss
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert transformer_layers(model)[-1].self_attn.q_proj.base_layer.weight.grad is None
    assert torch.equal(transformer_layers(model)[-1].self_attn.q_proj.base_layer.weight, base_q)


def test_lora_without_transfer_freezes_embeddings(peft_installed, gpt2_bl_model):
    bundle = load_student(StudentConfig(model=str(gpt2_bl_model), lora_rank=4, lora_alpha=8.0))
    names = _trainable_names(bundle.model)
    assert names and all("lora_" in n for n in names)
    assert bundle.info.lora["alpha"] == 8.0
    params = last_layer_parameters(bundle.model)
    assert params and all(p.requires_grad for p in params)
    with pytest.raises(ValueError, match="no trainable parameters"):
        last_layer_parameters(
            load_student(
                StudentConfig(model=str(gpt2_bl_model), lora_rank=4, lora_target_modules=("h.0.attn.c_attn",))
            ).model
        )


@pytest.mark.parametrize("case", ["gpt2_tied", "llama_untied"])
def test_lora_save_merged_and_unmerged(
    case, peft_installed, gpt2_bl_model, llama_sp_model, tokenizer_dirs, tmp_path
):
    if case == "gpt2_tied":  # tied embeddings stay tied under LoRA (peft ensure_weight_tying)
        config = StudentConfig(
            init_from=str(gpt2_bl_model), tokenizer=str(tokenizer_dirs["byte_level_small"]), lora_rank=8
        )
    else:
        config = StudentConfig(init_from=str(llama_sp_model), tokenizer="bytes", lora_rank=8, num_layers=1)
    bundle = load_student(config)
    _perturb_trainable(bundle.model)  # as after some training: adapters and embeddings non-trivial
    base = bundle.model.get_base_model()
    if case == "gpt2_tied":
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    ids = bundle.view.encode(TEXT).token_ids.tolist()
    ref = _logits(bundle.model, ids)

    merged = save_student(bundle, tmp_path / "merged", merge_lora=True)
    assert not (merged / "adapter_config.json").exists()
    m = AutoModelForCausalLM.from_pretrained(merged)
    torch.testing.assert_close(_logits(m, ids), ref, rtol=1e-4, atol=1e-4)
    out = m.generate(torch.tensor([ids[:5]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == 8

    unmerged = save_student(bundle, tmp_path / "unmerged")
    assert (unmerged / "adapter_config.json").exists()
    m = AutoModelForCausalLM.from_pretrained(unmerged)  # transformers applies the adapter it finds
    torch.testing.assert_close(_logits(m, ids), ref, rtol=0, atol=1e-6)
    # resume: the folder comes back as a trainable LoRA model
    resumed = load_student(StudentConfig(model=str(unmerged)))
    assert resumed.is_lora and resumed.info.trainable_parameters == bundle.info.trainable_parameters
    torch.testing.assert_close(_logits(resumed.model, ids), ref, rtol=0, atol=1e-6)
    assert last_layer_parameters(resumed.model)
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        load_student(StudentConfig(model=str(unmerged), lora_rank=8))
    # saving did not change the in-memory model
    torch.testing.assert_close(_logits(bundle.model, ids), ref, rtol=0, atol=0)


def test_missing_peft_gives_a_clear_error(gpt2_bl_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError, match="pip install"):
        load_student(StudentConfig(model=str(gpt2_bl_model), lora_rank=4))
