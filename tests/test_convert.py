"""Checkpoint conversion on the real key scheme: reference manifests, tiny original-layout round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stllm.configuration_stllm import STLLMConfig
from stllm.convert import convert_checkpoint, infer_config
from stllm.loading import WEIGHTS_HASH_FILE, compute_weights_hash, load_model, weights_hash
from stllm.modeling_stllm import STLLMForConditionalGeneration
from tests.original_layout import build_tiny_original, to_original_state_dict
from tests.tiny_fixtures import synthetic_frames

DATA = Path(__file__).parent / "data"
HEADS = dict(vision_heads=2, qformer_heads=2)  # the tiny model's (the defaults are EVA-g's 16 and BERT's 12)


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (DATA / f"stllm_{name}_keys.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = tuple(int(x) for x in shape.split("x"))
    return out


@pytest.mark.parametrize(
    "name, kwargs",
    [("conversation", dict(video_input="residual")), ("qa", dict(video_input="all", btadapter_depth=3, num_frames=16))],
)
def test_real_size_key_scheme_matches_released_manifest(name, kwargs):
    """Our model, written in the original naming, has exactly the released keys and shapes."""
    with torch.device("meta"):
        model = STLLMForConditionalGeneration(STLLMConfig(**kwargs))
    ours = {k: tuple(v.shape) for k, v in to_original_state_dict(model).items()}
    ref = {k: v for k, v in _manifest(name).items() if not k.endswith("rotary_emb.inv_freq")}
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: ours[k] for k in ref if ours[k] != ref[k]} == {}


def test_sizes_inferred_from_released_shapes():
    tensors = {k: torch.empty(s, device="meta") for k, s in _manifest("qa").items()}
    cfg = infer_config(tensors, {"num_attention_heads": 32, "max_position_embeddings": 2048}, pad_token_id=32000)
    v, q, t = cfg.vision_config, cfg.qformer_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1408, 39, 16, 6144)
    assert (v.image_size, v.patch_size) == (224, 14)
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.cross_attention_frequency) == (768, 12, 12, 2)
    assert (q.vocab_size, q.encoder_hidden_size) == (30523, 1408)
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.intermediate_size) == (4096, 32, 32001, 11008)
    assert (cfg.btadapter_depth, cfg.btadapter_max_frames, cfg.video_input, cfg.num_frames) == (3, 64, "all", 16)
    conv = infer_config({k: torch.empty(s, device="meta") for k, s in _manifest("conversation").items()},
                        {"num_attention_heads": 32})
    assert (conv.video_input, conv.residual_size, conv.num_frames) == ("residual", 16, 64)
    assert conv.residual_hidden_size == 1024
    assert conv.btadapter_depth == 0 and conv.use_mvm_decoder


def _logits(model, processor, seed=0, question="What is happening in the video?"):
    pq = processor.process_question(question)
    pv = processor.pixel_values(processor.sample(synthetic_frames(seed)))
    with torch.no_grad():
        return model(pv, pq.qformer_input_ids, pq.input_ids, pq.qformer_attention_mask).logits


@pytest.mark.parametrize(
    "kwargs, flags",
    [
        (dict(video_input="residual"), dict(residual_size=4, num_frames=8)),
        (dict(video_input="all", btadapter_depth=1), dict(num_frames=8)),
    ],
    ids=["conversation-residual", "qa-btadapter"],
)
def test_original_layout_round_trip_identical_logits(tmp_path, kwargs, flags):
    src, model = build_tiny_original(tmp_path / "orig", dtype=torch.float32, **kwargs)
    assert len(list(src.glob("pytorch_model-*-of-*.bin"))) == 2
    convert_checkpoint(str(src), tmp_path / "conv", **flags, **HEADS)
    loaded, processor = load_model(tmp_path / "conv", dtype="float32", device="cpu")
    assert loaded.config.video_input == model.config.video_input
    assert loaded.config.btadapter_depth == model.config.btadapter_depth
    assert torch.equal(_logits(model, processor), _logits(loaded, processor))


def test_bf16_shards_convert_and_keep_values(tmp_path):
    src, model = build_tiny_original(tmp_path / "orig", dtype=torch.bfloat16)
    convert_checkpoint(str(src), tmp_path / "conv", residual_size=4, num_frames=8, **HEADS)
    loaded, _ = load_model(tmp_path / "conv", dtype="bfloat16", device="cpu")
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k


def test_released_tokenizer_facts(tmp_path):
    src, _ = build_tiny_original(tmp_path / "orig", dtype=torch.float32)
    convert_checkpoint(str(src), tmp_path / "conv", residual_size=4, num_frames=8, **HEADS)
    _, processor = load_model(tmp_path / "conv", dtype="float32", device="cpu")
    tok = processor.tokenizer
    assert tok.bos_token == tok.eos_token == tok.unk_token == "</s>" and tok.bos_token_id == 2
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == len(tok) - 1
    assert len(processor.qformer_tokenizer) == 30523  # bert-base-uncased + [DEC]
    ids = processor.prompt_ids("Is it raining?")
    assert ids[0] == 2
    assert tok.decode(ids[1:]) == processor.prompt_text("Is it raining?")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    src, _ = build_tiny_original(tmp_path / "orig", dtype=torch.float32)
    dropped = "model.layers.1.mlp.up_proj.weight"
    for shard in sorted(src.glob("pytorch_model-*.bin")):
        sd = torch.load(shard, weights_only=True)
        sd.pop(dropped, None)
        sd["model.stllm_model.surprise.weight"] = torch.zeros(3)
        torch.save(sd, shard)
    with pytest.raises(ValueError) as err:
        convert_checkpoint(str(src), tmp_path / "conv", residual_size=4, num_frames=8, **HEADS)
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "model.stllm_model.surprise.weight" in msg
    assert "language_model." + dropped in msg


def test_load_rejects_incomplete_converted_folder(tmp_path, tiny_dir):
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(tiny_dir, dst)
    sd = load_file(dst / "model.safetensors")
    sd.pop("language_projection.weight")
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="language_projection.weight") as err:
        load_model(dst, dtype="float32", device="cpu")
    assert "extra.weight" in str(err.value)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    with pytest.raises(ValueError):
        convert_checkpoint(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_convert_cli(tmp_path):
    src, _ = build_tiny_original(tmp_path / "orig", dtype=torch.bfloat16)
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "convert", str(src), str(tmp_path / "conv"),
         "--residual-size", "4", "--frames", "8", "--dtype", "float32", "--vision-heads", "2",
         "--qformer-heads", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["video_input"] == "residual" and cfg["residual_size"] == 4 and cfg["num_frames"] == 8
    assert (tmp_path / "conv" / "model.safetensors").exists()
    assert json.loads((tmp_path / "conv" / WEIGHTS_HASH_FILE).read_text())["sha256"] == compute_weights_hash(
        tmp_path / "conv")


def test_head_counts_come_from_flags(tmp_path):
    """A vision width that is no multiple of EVA-g's 88 converts once its head count is given."""
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                  patch_size=14, layer_norm_eps=1e-6)
    src, model = build_tiny_original(tmp_path / "orig", dtype=torch.float32, vision_config=vision)
    with pytest.raises(ValueError, match="vision width 64 is not divisible by 3 heads.*--vision-heads"):
        convert_checkpoint(str(src), tmp_path / "bad", residual_size=4, num_frames=8, vision_heads=3)
    with pytest.raises(ValueError, match="--qformer-heads"):
        convert_checkpoint(str(src), tmp_path / "bad", residual_size=4, num_frames=8, vision_heads=4,
                           qformer_heads=12)
    convert_checkpoint(str(src), tmp_path / "conv", residual_size=4, num_frames=8, vision_heads=4, qformer_heads=2)
    loaded, processor = load_model(tmp_path / "conv", dtype="float32", device="cpu")
    assert loaded.config.vision_config.num_attention_heads == 4
    assert torch.equal(_logits(model, processor), _logits(loaded, processor))


def test_weights_hash_follows_the_weights(tmp_path):
    a, _ = build_tiny_original(tmp_path / "a", dtype=torch.float32, seed=0)
    b, _ = build_tiny_original(tmp_path / "b", dtype=torch.float32, seed=1)
    out = tmp_path / "conv"
    convert_checkpoint(str(a), out, residual_size=4, num_frames=8, **HEADS)
    first = weights_hash(out)
    convert_checkpoint(str(a), tmp_path / "copy", residual_size=4, num_frames=8, **HEADS)
    assert weights_hash(tmp_path / "copy") == first  # same weights, other folder: same identity
    convert_checkpoint(str(b), out, residual_size=4, num_frames=8, **HEADS)  # re-converted into the same folder
    assert weights_hash(out) != first
    (out / WEIGHTS_HASH_FILE).unlink()  # a folder without the record: computed on the fly
    assert weights_hash(out) == compute_weights_hash(out) != first


def test_float16_is_refused_where_a_value_would_overflow(tmp_path):
    src, _ = build_tiny_original(tmp_path / "orig", dtype=torch.bfloat16)
    key = "model.stllm_model.llama_proj.weight"
    for shard in sorted(src.glob("pytorch_model-*.bin")):
        sd = torch.load(shard, weights_only=True)
        if key in sd:
            sd[key][0, 0] = 1e6  # representable in bfloat16, inf in float16
            torch.save(sd, shard)
    with pytest.raises(ValueError, match=r"language_projection.weight \(max \|x\| 9.9"):
        convert_checkpoint(str(src), tmp_path / "fp16", residual_size=4, num_frames=8, dtype="float16", **HEADS)
    convert_checkpoint(str(src), tmp_path / "bf16", residual_size=4, num_frames=8, **HEADS)  # kept as bf16: fine
    with pytest.raises(ValueError, match="do not fit float16.*language_projection.weight"):
        load_model(tmp_path / "bf16", dtype="float16", device="cpu")


def test_qformer_tokenizer_is_real_bert_uncased(tmp_path):
    src, _ = build_tiny_original(tmp_path / "orig", dtype=torch.float32)
    convert_checkpoint(str(src), tmp_path / "conv", residual_size=4, num_frames=8, **HEADS)
    _, processor = load_model(tmp_path / "conv", dtype="float32", device="cpu")
    qtok = processor.qformer_tokenizer
    # bert-base-uncased ids: [CLS] what moves ? [SEP]; [DEC] appended as bos
    assert qtok("What moves?").input_ids == [101, 2054, 5829, 1029, 102]
    assert qtok.bos_token == "[DEC]" and qtok.bos_token_id == 30522
    # An explicit source is used as given, and checked: a vocabulary that is not BERT uncased is refused.
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello"]) + "\n")
    with pytest.raises(ValueError, match="not the BERT uncased vocabulary"):
        convert_checkpoint(str(src), tmp_path / "bad", residual_size=4, num_frames=8, qformer_tokenizer=vocab,
                           **HEADS)
