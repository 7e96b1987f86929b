"""Checkpoints: round trips, the layout on disk, atomic saves, the upstream layout, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tah.model.checkpoint as checkpoint
from conftest import UPSTREAM, randomize_lora, tiny_lm, tiny_tah
from tah import CheckpointError, InputError, TaHConfig, TaHError, TaHForCausalLM

UPSTREAM_CKPT = UPSTREAM / "checkpoint"


def ids_batch(batch: int = 2, length: int = 12, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model: TaHForCausalLM, ids: torch.Tensor, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_same_outputs(a: TaHForCausalLM, b: TaHForCausalLM, ids: torch.Tensor) -> None:
    out_a, out_b = run(a, ids), run(b, ids)
    torch.testing.assert_close(out_b.logits, out_a.logits, rtol=0, atol=0)
    assert torch.equal(out_b.iter_count, out_a.iter_count)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A native checkpoint with LoRA rank 4 and an MLP decider, written once for the error tests."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    tiny_tah(decider="mlp", threshold=0.4).save_pretrained(root)
    return root


@pytest.fixture
def copy_of_saved(saved, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


@pytest.fixture
def upstream_copy(tmp_path) -> Path:
    dst = tmp_path / "upstream"
    shutil.copytree(UPSTREAM_CKPT, dst)
    for p in [dst, *dst.rglob("*")]:  # the fixture is read-only; the copy must be writable
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


# -- round trips --------------------------------------------------------------------------------
def test_round_trip_mlp_decider_with_a_mix_of_depths(tmp_path):
    model = tiny_tah(decider="mlp", threshold=0.4)
    ids = ids_batch()
    counts = run(model, ids).iter_count
    assert counts.min() == 1 and counts.max() == 2, "the threshold should make some tokens iterate, not all"

    model.save_pretrained(tmp_path / "ckpt")
    loaded = TaHForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.tah_config == model.tah_config
    assert_same_outputs(model, loaded, ids)
    for name, value in model.decider.state_dict().items():
        assert torch.equal(loaded.decider.state_dict()[name], value), name


def test_round_trip_lora_per_depth(tmp_path):
    model = tiny_tah(decider="mlp", threshold=0.2, max_iter=3, lora_per_depth=True)
    first = next(iter(model.lora.values()))
    assert len(first.lora_A) == 2 and not torch.equal(first.lora_B[0], first.lora_B[1])
    ids = ids_batch()
    assert run(model, ids).iter_count.max() == 3, "some token should reach depth 2 (its own adapter)"

    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "lora" / "depth_2" / "adapter_model.safetensors").is_file()
    loaded = TaHForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.tah_config.lora_per_depth and loaded.tah_config.max_iter == 3
    assert_same_outputs(model, loaded, ids)
    for path, module in model.lora.items():
        for index in range(2):
            assert torch.equal(loaded.lora[path].lora_A[index], module.lora_A[index]), (path, index)
            assert torch.equal(loaded.lora[path].lora_B[index], module.lora_B[index]), (path, index)


def test_round_trip_random_decider_keeps_rate_and_seed(tmp_path):
    # tiny_tah's own `seed` is the base model's; the decider's seed is a TaHConfig field
    config = dict(max_iter=2, input_topk=8, lora_rank=4, lora_alpha=8.0, decider="random", random_rate=0.5, seed=7)
    model = TaHForCausalLM.from_base(tiny_lm(seed=0), TaHConfig(**config)).eval()
    randomize_lora(model)
    ids = ids_batch(length=16)
    counts = run(model, ids).iter_count
    assert counts.min() == 1 and counts.max() == 2
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "decider.safetensors").exists()  # nothing to save for it
    loaded = TaHForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert (loaded.tah_config.random_rate, loaded.tah_config.seed) == (0.5, 7)
    assert_same_outputs(model, loaded, ids)


def test_saved_base_is_plain_hf_and_equals_depth_0(tmp_path):
    model = tiny_tah(decider="mlp", threshold=0.4)
    model.save_pretrained(tmp_path / "ckpt")
    root = tmp_path / "ckpt"
    assert {"config.json", "model.safetensors", "tah_config.json", "decider.safetensors",
            "lora/adapter_model.safetensors", "lora/adapter_config.json"} <= files_under(root)

    hf = AutoModelForCausalLM.from_pretrained(root).eval()
    bare = tiny_lm(seed=0)
    assert set(hf.state_dict()) == set(bare.state_dict()), "the saved base must have the plain HF key names"
    for name, value in bare.state_dict().items():
        assert torch.equal(hf.state_dict()[name], value), name
    # wrapping must survive the save: the in-memory model still has its adapters
    assert all(type(m).__name__ == "DepthLoRALinear" for m in model.lora.values())
    assert type(model.lm.get_submodule(next(iter(model.lora)))).__name__ == "DepthLoRALinear"

    ids = ids_batch()
    never = TaHForCausalLM.from_pretrained(root, decider="never").eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=ids).logits
    out = run(never, ids)
    assert torch.equal(out.iter_count, torch.ones_like(ids))
    torch.testing.assert_close(out.logits, hf_logits, rtol=0, atol=1e-5)


def test_no_pickles_and_peft_style_lora_keys(tmp_path):
    model = tiny_tah(decider="mlp", threshold=0.4, max_iter=3, lora_per_depth=True)
    model.save_pretrained(tmp_path / "ckpt")
    root = tmp_path / "ckpt"
    pickles = [f for f in files_under(root) if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not pickles, f"pickled files in our layout: {pickles}"
    for f in files_under(root):
        if f.endswith(".json"):
            json.loads((root / f).read_text())

    for index, folder in enumerate([root / "lora", root / "lora" / "depth_2"]):
        tensors = load_file(folder / "adapter_model.safetensors")
        expected = {f"base_model.model.{path}.lora_{ab}.weight" for path in model.lora for ab in "AB"}
        assert set(tensors) == expected
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
        for path, module in model.lora.items():
            assert torch.equal(tensors[f"base_model.model.{path}.lora_A.weight"], module.lora_A[index])
            assert torch.equal(tensors[f"base_model.model.{path}.lora_B.weight"], module.lora_B[index])
        peft_config = json.loads((folder / "adapter_config.json").read_text())
        assert peft_config["peft_type"] == "LORA"
        assert (peft_config["r"], peft_config["lora_alpha"]) == (4, 8.0)


def test_load_in_bfloat16(saved):
    model = TaHForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).eval()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert any(".lora_A." in n for n in dtypes) and any(n.startswith("decider.") for n in dtypes)
    wrong = {n: d for n, d in dtypes.items() if d != torch.bfloat16}
    assert not wrong, f"not bfloat16: {wrong}"
    out = run(model, ids_batch())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# -- atomic saves -------------------------------------------------------------------------------
def test_save_over_existing_checkpoint_replaces_it(tmp_path):
    root = tmp_path / "ckpt"
    tiny_tah(decider="mlp", threshold=0.4, max_iter=3, lora_per_depth=True).save_pretrained(root)
    newer = tiny_tah(seed=1, decider="random", random_rate=0.5)
    newer.save_pretrained(root)
    assert os.listdir(tmp_path) == ["ckpt"], "no staging or backup directories may stay behind"
    # nothing of the old checkpoint survives (its decider and depth-2 adapter would confuse a reader)
    assert not (root / "decider.safetensors").exists()
    assert not (root / "lora" / "depth_2").exists()
    loaded = TaHForCausalLM.from_pretrained(root).eval()
    assert loaded.tah_config == newer.tah_config
    assert_same_outputs(newer, loaded, ids_batch())


def _fail_on(monkeypatch, suffix: str, exc: BaseException) -> list[str]:
    """Make checkpoint's safetensors writer raise when it writes a file ending in `suffix`."""
    written: list[str] = []

    def failing_save_file(tensors, filename, *args, **kwargs):
        written.append(str(filename))
        if str(filename).endswith(suffix):
            raise exc
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    return written


@pytest.mark.parametrize("suffix, exc", [
    ("decider.safetensors", OSError("disk full")),
    ("adapter_model.safetensors", RuntimeError("boom")),
    ("decider.safetensors", KeyboardInterrupt()),
])
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, suffix, exc):
    root = tmp_path / "ckpt"
    old = tiny_tah(decider="mlp", threshold=0.4)
    old.save_pretrained(root)
    before = {f: (root / f).read_bytes() for f in files_under(root)}

    written = _fail_on(monkeypatch, suffix, exc)
    with pytest.raises(type(exc)):
        tiny_tah(seed=1, decider="mlp", threshold=0.4).save_pretrained(root)
    assert any(w.endswith(suffix) for w in written), "the simulated crash did not happen"
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["ckpt"], "the failed save left temporary directories behind"
    assert {f: (root / f).read_bytes() for f in files_under(root)} == before
    assert_same_outputs(old, TaHForCausalLM.from_pretrained(root).eval(), ids_batch())


def test_crash_while_saving_to_a_new_path_leaves_nothing(tmp_path, monkeypatch):
    _fail_on(monkeypatch, "decider.safetensors", OSError("disk full"))
    with pytest.raises(OSError):
        tiny_tah(decider="mlp").save_pretrained(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_failure_while_swapping_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The last step swaps directories; if moving the new one into place fails, the old one must
    be back at its path (not left in a hidden backup directory)."""
    root = tmp_path / "ckpt"
    old = tiny_tah(decider="mlp", threshold=0.4)
    old.save_pretrained(root)
    real_replace = os.replace

    def replace(src, dst):
        if ".saving-" in Path(src).name:  # the staging directory moving into place
            raise OSError("simulated failure while moving the new checkpoint into place")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError):
        tiny_tah(seed=1, decider="mlp").save_pretrained(root)
    monkeypatch.undo()

    assert root.is_dir(), f"the previous checkpoint is gone from {root}; left: {sorted(os.listdir(tmp_path))}"
    assert os.listdir(tmp_path) == ["ckpt"], "the failed save left temporary directories behind"
    assert_same_outputs(old, TaHForCausalLM.from_pretrained(root).eval(), ids_batch())


# -- the original implementation's layout -------------------------------------------------------
def test_upstream_layout_maps_onto_our_config_and_reads_the_pickle_safely(monkeypatch):
    real_load = torch.load
    calls = []

    def spy_load(*args, **kwargs):
        calls.append((args, kwargs))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", spy_load)
    model = TaHForCausalLM.from_pretrained(UPSTREAM_CKPT).eval()
    monkeypatch.undo()

    assert calls, "iter_decider.bin was not read with torch.load"
    for _args, kwargs in calls:
        assert kwargs.get("weights_only") is True, f"torch.load called without weights_only=True: {kwargs}"
    assert any(str(args[0] if args else kwargs.get("f")).endswith("iter_decider.bin") for args, kwargs in calls)

    cfg = model.tah_config
    assert cfg.max_iter == 2 and cfg.input_topk == 16
    assert cfg.lora_rank == 4 and cfg.lora_alpha == 8.0 and not cfg.lora_per_depth
    assert cfg.decider == "mlp" and cfg.decider_layers == [1, 2, 3, 4]
    assert cfg.decider_hidden_dims == [32, 32] and cfg.decider_topk == 16
    assert cfg.threshold == pytest.approx(0.9)
    assert model.decider.needs_hidden == (1, 2, 3, 4) and model.decider.threshold == pytest.approx(0.9)

    # the adapter and decider weights are the files' own
    tensors = load_file(UPSTREAM_CKPT / "lora" / "adapter_model.safetensors")
    assert len(model.lora) == 4 * 7
    for path, module in model.lora.items():
        assert torch.equal(module.lora_A[0], tensors[f"base_model.model.{path}.lora_A.weight"]), path
        assert torch.equal(module.lora_B[0], tensors[f"base_model.model.{path}.lora_B.weight"]), path
    saved = real_load(UPSTREAM_CKPT / "iter_decider.bin", map_location="cpu", weights_only=True)["state_dict"]
    for name, value in model.decider.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_upstream_checkpoint_resaves_in_our_layout(tmp_path):
    model = TaHForCausalLM.from_pretrained(UPSTREAM_CKPT).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert not [f for f in files_under(tmp_path / "ckpt") if f.endswith(".bin")]
    again = TaHForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert again.tah_config == model.tah_config
    assert_same_outputs(model, again, ids_batch(vocab=256, length=16))


# -- checkpoint errors --------------------------------------------------------------------------
def expect_checkpoint_error(path: Path, *names: str, **overrides) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        TaHForCausalLM.from_pretrained(path, **overrides)
    assert isinstance(info.value, TaHError)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return info.value


@pytest.mark.parametrize("missing", [
    "model.safetensors", "tah_config.json", "config.json", "lora/adapter_model.safetensors", "decider.safetensors",
])
def test_missing_file(copy_of_saved, missing):
    (copy_of_saved / missing).unlink()
    expect_checkpoint_error(copy_of_saved, Path(missing).name)


def test_missing_depth_2_adapter(tmp_path):
    tiny_tah(decider="never", max_iter=3, lora_per_depth=True).save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "lora" / "depth_2")
    expect_checkpoint_error(tmp_path / "ckpt", "depth_2", "adapter_model.safetensors")


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _garbage(file: Path) -> None:
    file.write_bytes(os.urandom(64) + b"\x00" * 100)


@pytest.mark.parametrize("corrupt", [_truncate, _garbage], ids=["truncated", "garbage"])
@pytest.mark.parametrize("name", ["decider.safetensors", "lora/adapter_model.safetensors", "model.safetensors"])
def test_corrupt_safetensors(copy_of_saved, corrupt, name):
    corrupt(copy_of_saved / name)
    expect_checkpoint_error(copy_of_saved, Path(name).name)


@pytest.mark.parametrize("name", ["tah_config.json", "config.json"])
def test_invalid_json(copy_of_saved, name):
    (copy_of_saved / name).write_text('{"max_iter": 2,,')
    expect_checkpoint_error(copy_of_saved, name)


def test_tah_config_with_a_bad_value_is_a_tah_error(copy_of_saved):
    file = copy_of_saved / "tah_config.json"
    raw = json.loads(file.read_text())
    raw["max_iter"] = 0
    file.write_text(json.dumps(raw))
    with pytest.raises(TaHError, match="max_iter"):
        TaHForCausalLM.from_pretrained(copy_of_saved)


def test_lora_of_another_rank_names_the_module(copy_of_saved):
    file = copy_of_saved / "lora" / "adapter_model.safetensors"
    tensors = load_file(file)
    other = {}
    for key, value in tensors.items():
        shape = (2, value.shape[1]) if ".lora_A." in key else (value.shape[0], 2)
        other[key] = torch.zeros(shape)
    save_file(other, file)
    err = expect_checkpoint_error(copy_of_saved, "adapter_model.safetensors", "model.layers.0.self_attn.q_proj")
    assert "rank" in str(err)


def test_lora_for_another_base_names_the_module(copy_of_saved):
    file = copy_of_saved / "lora" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)  # other in_features
    save_file(tensors, file)
    expect_checkpoint_error(copy_of_saved, "adapter_model.safetensors", "model.layers.1.mlp.down_proj")


def test_lora_missing_a_module_names_it(copy_of_saved):
    file = copy_of_saved / "lora" / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, file)
    expect_checkpoint_error(copy_of_saved, "model.layers.1.self_attn.v_proj")


def test_decider_of_another_shape_names_the_file(saved):
    expect_checkpoint_error(saved, "decider.safetensors", decider_hidden_dims=[8])


def test_upstream_corrupt_iter_decider(upstream_copy):
    _garbage(upstream_copy / "iter_decider.bin")
    expect_checkpoint_error(upstream_copy, "iter_decider.bin")


def test_upstream_truncated_iter_decider(upstream_copy):
    _truncate(upstream_copy / "iter_decider.bin")
    expect_checkpoint_error(upstream_copy, "iter_decider.bin")


def test_upstream_missing_iter_decider(upstream_copy):
    (upstream_copy / "iter_decider.bin").unlink()
    expect_checkpoint_error(upstream_copy, "iter_decider.bin")


def test_upstream_pickle_with_code_is_refused(upstream_copy):
    """A pickle that would run code on load must be refused, not executed."""

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    torch.save({"state_dict": {}, "init_args": {}, "evil": Payload()}, upstream_copy / "iter_decider.bin")
    expect_checkpoint_error(upstream_copy, "iter_decider.bin")


def test_nonexistent_directory(tmp_path):
    expect_checkpoint_error(tmp_path / "nowhere", "nowhere")


def test_a_file_instead_of_a_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    expect_checkpoint_error(tmp_path / "model.safetensors", "model.safetensors")


# -- input errors -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> TaHForCausalLM:
    return tiny_tah(decider="mlp", threshold=0.4)


def test_sequence_longer_than_max_positions(small):
    assert small.lm.config.max_position_embeddings == 128
    run(small, ids_batch(length=128))  # exactly the limit is fine
    with pytest.raises(InputError, match="max_position_embeddings") as info:
        run(small, ids_batch(length=129))
    assert isinstance(info.value, TaHError)


def test_decoding_past_max_positions(small):
    out = run(small, ids_batch(batch=1, length=127), use_cache=True)
    out = run(small, ids_batch(batch=1, length=1), past_key_values=out.past_key_values, use_cache=True)
    with pytest.raises(InputError, match="max_position_embeddings"):
        run(small, ids_batch(batch=1, length=1), past_key_values=out.past_key_values, use_cache=True)


@pytest.mark.parametrize("shape", [(2, 11), (1, 12), (2, 12, 1), (24,)])
def test_iter_labels_of_wrong_shape(small, shape):
    with pytest.raises(InputError, match="iter_labels") as info:
        run(small, ids_batch(), iter_labels=torch.ones(shape, dtype=torch.long))
    assert isinstance(info.value, TaHError)


@pytest.mark.parametrize("shape", [(2, 11), (1, 12), (2, 13)])
def test_labels_of_wrong_shape(small, shape):
    with pytest.raises(InputError, match="labels") as info:
        run(small, ids_batch(), labels=torch.zeros(shape, dtype=torch.long))
    assert isinstance(info.value, TaHError) and "iter_labels" not in str(info.value)
