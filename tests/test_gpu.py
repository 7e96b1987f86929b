"""The GPU cases (marker `gpu`, skipped without CUDA): the fixture parity, fused == unfused decoding,
a bf16 autocast training step, batched bf16 generation and the static engine, all on CUDA.

Each check is a function of the device, so it also runs on CPU (`check_*("cpu")`), where the suite's
other tests already hold the same properties; only the CUDA cases are collected here."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from safetensors.torch import load_file

from conftest import UPSTREAM, left_padded, randomize_lora, tiny_tah
from tah import TaHForCausalLM
from tah.generation import generate
from test_parity_upstream import TOL, assert_matches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ENGINE_KEYWORD = "engine" in inspect.signature(generate).parameters
CUDA = torch.device("cuda")


def strong_model(decider: str = "random", rate: float = 0.4, max_iter: int = 2, **config) -> TaHForCausalLM:
    """LoRA strong enough that deeper passes often change the argmax, so drafts get rejected too."""
    model = tiny_tah(decider=decider, random_rate=rate, max_iter=max_iter, lora_per_depth=True, **config)
    randomize_lora(model, std=2.0, seed=3)
    return model


def engine(name: str) -> dict:
    """generate's engine= argument where it has one (the eager engine is the only one otherwise)."""
    return {"engine": name} if ENGINE_KEYWORD else {}


def assert_same_decoding(out, expected, what: str) -> None:
    assert torch.equal(out.sequences.cpu(), expected.sequences.cpu()), what
    assert torch.equal(out.iter_counts.cpu(), expected.iter_counts.cpu()), what


# -- (a) the original implementation's fixture, float32 ----------------------------------------------
def upstream_model(device, **overrides) -> TaHForCausalLM:
    return TaHForCausalLM.from_pretrained(UPSTREAM / "checkpoint", dtype=torch.float32, **overrides).to(device)


def voted_past_max_iter(device, input_ids, attention_mask=None) -> torch.Tensor:
    """(B, T) bool on the CPU: tokens whose decider votes "continue" after the last allowed pass
    (see test_parity_upstream.py), asked on `device`."""
    probe = upstream_model(device, max_iter=3).eval()
    mask = None if attention_mask is None else attention_mask.to(device)
    with torch.no_grad():
        return (probe(input_ids.to(device), attention_mask=mask).iter_count == 3).cpu()


def check_parity_prefill(device) -> None:
    ref = load_file(UPSTREAM / "reference_outputs.safetensors")
    ids = ref["prefill.input_ids"]
    with torch.no_grad():
        out = upstream_model(device).eval()(ids.to(device))
    unwritten = voted_past_max_iter(device, ids)
    assert unwritten.any() and (~unwritten & (out.iter_count.cpu() == 2)).any()
    everywhere = torch.ones_like(ids, dtype=torch.bool)
    assert_matches(out.logits.cpu(), ref["prefill.logits"], out.iter_count.cpu(), ref["prefill.iter_count"],
                   everywhere, unwritten)


def check_parity_padded(device) -> None:
    ref = load_file(UPSTREAM / "reference_outputs.safetensors")
    ids, mask = ref["padded.input_ids"], ref["padded.attention_mask"]
    with torch.no_grad():
        out = upstream_model(device).eval()(ids.to(device), attention_mask=mask.to(device))
    unwritten = voted_past_max_iter(device, ids, mask) & mask.bool()
    assert_matches(out.logits.cpu(), ref["padded.logits"], out.iter_count.cpu(), ref["padded.iter_count"],
                   mask.bool(), unwritten)


def check_parity_decode(device) -> None:
    ref = load_file(UPSTREAM / "reference_outputs.safetensors")
    model = upstream_model(device).eval()
    prompt, tokens = ref["decode.prompt"], ref["decode.tokens"]
    with torch.no_grad():
        out = model(prompt.to(device), use_cache=True)
        cache, counts = out.past_key_values, [out.iter_count[0].cpu()]
        next_token = out.logits[0, -1].argmax()
        for step in range(tokens.numel()):
            assert int(next_token) == int(tokens[step]), f"step {step}"
            out = model(next_token.view(1, 1), past_key_values=cache, use_cache=True)
            assert (out.logits[0, -1].cpu() - ref["decode.step_logits"][step]).abs().max() <= TOL, f"step {step}"
            counts.append(out.iter_count[0].cpu())
            next_token = out.logits[0, -1].argmax()
    assert torch.equal(torch.cat(counts), ref["decode.iter_count"])
    assert int(cache.entries()[0]) == int(ref["decode.iter_count"].sum())  # depth-1 entries: iterated tokens only


def check_parity_stage1(device) -> None:
    ref = load_file(UPSTREAM / "reference_outputs.safetensors")
    model = upstream_model(device, decider="oracle").train()
    out = model(ref["step1.input_ids"].to(device), labels=ref["step1.labels"].to(device),
                iter_labels=ref["step1.iter_count_labels"].to(device))
    assert abs(out.loss.item() - ref["step1.loss"].item()) <= TOL
    assert torch.equal(out.iter_count.cpu(), ref["step1.iter_count"])
    assert (out.logits.detach().cpu() - ref["step1.logits"]).abs().max() <= TOL
    out.loss.backward()


PARITY = {"prefill": check_parity_prefill, "padded": check_parity_padded, "decode": check_parity_decode,
          "stage1": check_parity_stage1}


@pytest.mark.parametrize("part", list(PARITY))
def test_upstream_fixture_parity_in_float32(part):
    PARITY[part](CUDA)


# -- (b) fused == unfused -------------------------------------------------------------------------------
def check_fused_equals_unfused(device) -> None:
    """Greedy tokens and pass counts of fused decoding (every draft count, and the default engine)
    equal the unfused loop's, on a left-padded batch and one prompt at a time."""
    ids, mask = (t.to(device) for t in left_padded([5, 9, 3, 7], seed=1))
    for max_iter in (2, 3):
        model = strong_model(rate=0.4, max_iter=max_iter).to(device)
        unfused = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, fused=False)
        assert (unfused.iter_counts > 1).any() and (unfused.iter_counts == 1).any()
        for candidates in (1, 2, 4):
            fused = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, draft_candidates=candidates,
                             **engine("eager"))
            assert_same_decoding(fused, unfused, f"max_iter {max_iter}, {candidates} draft candidates")
            assert fused.stats.drafts > 0 and fused.stats.forwards < unfused.stats.forwards
        default = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7)  # "auto": static on CUDA
        assert_same_decoding(default, unfused, f"max_iter {max_iter}, default engine")
        for b in range(ids.shape[0]):  # one prompt alone: batch 1's defaults
            prompt = ids[b:b + 1, mask[b].bool()]
            alone = generate(model, prompt, max_new_tokens=24, eos_token_id=7)
            expected = generate(model, prompt, max_new_tokens=24, eos_token_id=7, fused=False)
            assert_same_decoding(alone, expected, f"max_iter {max_iter}, prompt {b} alone")


def test_fused_equals_unfused_greedy():
    check_fused_equals_unfused(CUDA)


# -- (c) bf16 autocast training step ---------------------------------------------------------------------
def check_bf16_autocast_step(device) -> None:
    """One stage-1 step (forward, backward, AdamW) under autocast bf16 from float32 weights, as HF
    Trainer's bf16 runs it, against the same step in float32: the losses within 1e-2, the gradients
    alike (cosine > 0.99 over every trainable parameter), every gradient and weight finite."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = tiny_tah(max_iter=2, vocab=256).to(device).train()
    ids, mask = (t.to(device) for t in left_padded([24, 30, 17, 30], vocab=256, seed=4))
    labels = ids.masked_fill(mask == 0, -100)
    iter_labels = torch.ones_like(ids)
    iter_labels[:, ::3] = 2
    iter_labels = iter_labels.masked_fill(mask == 0, -100)
    losses, grads = {}, {}
    for name, autocast in (("float32", False), ("bf16", True)):
        replica = copy.deepcopy(model)
        params = [p for p in replica.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = replica(ids, mask, labels=labels, iter_labels=iter_labels)
        assert (out.iter_count == 2).any()
        out.loss.backward()
        grads[name] = torch.cat([p.grad.flatten().float() for p in params])
        optimizer.step()
        losses[name] = out.loss.item()
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params), name
    assert abs(losses["bf16"] - losses["float32"]) <= 1e-2, losses
    assert torch.isfinite(grads["bf16"]).all()
    assert torch.nn.functional.cosine_similarity(grads["bf16"], grads["float32"], dim=0) > 0.99


def test_bf16_autocast_stage1_step_matches_float32():
    check_bf16_autocast_step(CUDA)


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def device_waits(device, step) -> int:
    """How often the host waits for the device in step(): the profiler's synchronize calls."""
    from torch.profiler import ProfilerActivity, profile
    step()  # warm: first-call allocations and lazy initialisation
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    return sum(e.count for e in prof.key_averages() if e.key in SYNC_EVENTS) - 1  # less the closing one


def check_stage1_step_waits_like_sft(device, stage: int = 1) -> None:
    """Issue 26: a stage-1 step (left-padded batch, 10% of the tokens hard, bf16 autocast) makes the
    host wait for the device at most twice more than the bare model's SFT step on the same batch:
    the forward's one read of its plan (`LabelPlan`), and the soft input's embedding-bag backward
    (which, like the input embedding's backward in both, counts its segments on the host). A
    stage-2 step (the decider's) as well."""
    model = strong_model("mlp").to(device).train()
    model.set_training_stage(stage)
    ids, mask = (t.to(device) for t in left_padded([24, 30, 17, 30], seed=0))
    iter_labels = torch.ones_like(ids)
    iter_labels[:, ::10] = 2
    labels = ids.masked_fill(mask == 0, -100)

    def step(forward):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward()
            loss.backward()
        return run

    sft = copy.deepcopy(model.lm).requires_grad_(True)  # (stage 2 froze the copied weights)
    tah_waits = device_waits(device, step(lambda: model(ids, mask, labels=labels,
                                                         iter_labels=iter_labels.masked_fill(mask == 0, -100)).loss))
    sft_waits = device_waits(device, step(lambda: sft(ids, attention_mask=mask, labels=labels).loss))
    assert tah_waits <= sft_waits + 2, f"stage {stage} waits {tah_waits} times, SFT {sft_waits}"


@pytest.mark.parametrize("stage", [1, 2])
def test_stage1_step_waits_on_the_device_about_as_often_as_sft(stage):
    check_stage1_step_waits_like_sft(CUDA, stage)


# -- (d) batched bf16 generation --------------------------------------------------------------------------
def check_batched_bf16_generation(device) -> None:
    """A batch of 8 left-padded prompts decodes, in bf16, what each prompt decodes alone."""
    model = strong_model(rate=0.3).to(device, torch.bfloat16)
    ids, mask = (t.to(device) for t in left_padded([5, 9, 3, 7, 12, 1, 8, 4], seed=2))
    width, new = ids.shape[1], 16
    batch = generate(model, ids, mask, max_new_tokens=new)
    assert (batch.iter_counts > 1).any()
    for b in range(ids.shape[0]):
        prompt = ids[b:b + 1, mask[b].bool()]
        alone = generate(model, prompt, max_new_tokens=new)
        assert torch.equal(batch.sequences[b, width:].cpu(), alone.sequences[0, prompt.shape[1]:].cpu()), f"row {b}"
        assert torch.equal(batch.iter_counts[b].cpu(), alone.iter_counts[0].cpu()), f"row {b}"


def test_batch_of_8_left_padded_bf16_equals_each_row_alone():
    check_batched_bf16_generation(CUDA)


# -- (e) the static engine --------------------------------------------------------------------------------
def check_static_equals_eager(device) -> None:
    """engine="static" (on CUDA: CUDA graphs, captured on the first call and replayed on the next)
    decodes the eager engine's greedy tokens and pass counts, with rows stopping at EOS on the way."""
    if not ENGINE_KEYWORD:
        pytest.skip("tah.generate takes no engine= keyword (no static engine in this tah)")
    for decider in ("random", "mlp", "always", "never"):
        model = strong_model(decider).to(device)
        model.set_threshold(0.4)
        for lengths in ([5, 9, 3, 7], [6]):
            ids, mask = (t.to(device) for t in left_padded(lengths, seed=len(lengths)))
            eager = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, engine="eager")
            for call in ("first", "second"):
                static = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, engine="static")
                assert_same_decoding(static, eager, f"{decider}, batch {len(lengths)}, {call} call")
            if decider == "random" and len(lengths) > 1:
                assert (eager.iter_counts == 2).any() and (eager.iter_counts == 1).any()


def test_static_engine_equals_eager_engine():
    check_static_equals_eager(CUDA)


def check_compiled_static_equals_eager(device) -> None:
    """`compile_decode_steps`: inductor's fused step kernels, captured in CUDA graphs, decode the
    eager engine's tokens and pass counts (float32: fusion may only change rounding)."""
    if not ENGINE_KEYWORD:
        pytest.skip("tah.generate takes no engine= keyword (no static engine in this tah)")
    model = strong_model("mlp").to(device)
    model.set_threshold(0.4)
    ids, mask = (t.to(device) for t in left_padded([5, 9, 3, 7], seed=4))
    eager = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, engine="eager")
    model.compile_decode_steps()
    try:
        for call in ("first", "second"):  # compile + capture, then replay
            static = generate(model, ids, mask, max_new_tokens=24, eos_token_id=7, engine="static")
            assert_same_decoding(static, eager, f"compiled steps, {call} call")
    finally:
        model.compile_decode_steps(enabled=False)


def test_compiled_static_engine_equals_eager_engine():
    check_compiled_static_equals_eager(CUDA)


def check_static_sampling_graphs_equal_no_graphs(device) -> None:
    """Static-engine sampling: a seeded call draws the same tokens whether its steps replay CUDA graphs
    or run as they are (the noise is drawn outside the graphs), on the first call (capture) and the
    next (replay), with drafts both kept and redrawn."""
    try:
        from tah.generation.sampling import Sampler
        from tah.generation.static import StaticDecoder
        StaticDecoder(strong_model(), Sampler(), max_new_tokens=1, eos_ids=set())
    except (ImportError, TypeError):
        pytest.skip("this tah's static engine does not sample")
    model = strong_model("random", rate=0.5).to(device)
    ids, mask = (t.to(device) for t in left_padded([5, 9, 3, 7], seed=2))

    def sampled(graphs: bool):
        sampler = Sampler(True, temperature=0.8, top_k=20, top_p=0.9,
                          generator=torch.Generator(device=device).manual_seed(7))
        decoder = StaticDecoder(model.eval(), sampler, max_new_tokens=24, eos_ids={7}, graphs=graphs)
        return decoder.run(ids, mask.long())

    plain = sampled(False)
    assert 0 < plain.stats.drafts_accepted < plain.stats.drafts
    for call in ("first", "second"):
        assert_same_decoding(sampled(device.type == "cuda"), plain, f"sampling, {call} call")


def test_static_sampling_with_graphs_equals_without():
    check_static_sampling_graphs_equal_no_graphs(CUDA)


def check_static_server_rows_with_graphs_equal_their_solo_runs(device) -> None:
    """The server's batch on the static engine, replaying CUDA graphs: requests (greedy and seeded,
    more than its rows) joining free rows between steps each decode their solo static run, and the
    log-probabilities wanted come with them."""
    try:
        from tah.generation.static_slots import StaticBatchDecoder
    except ImportError:
        pytest.skip("this tah has no static-engine server batch")
    from tah.generation.sampling import Sampler
    from tah.generation.slots import Request
    model = strong_model("random", rate=0.5).to(device).eval()
    decoder = StaticBatchDecoder(model, max_batch=3, graphs=device.type == "cuda")
    prompts = [[3 + (5 * i + j) % 50 for j in range(2 + i % 5)] for i in range(7)]

    def request(i: int) -> Request:
        sampler = Sampler(True, temperature=0.8, top_p=0.9, generator=torch.Generator(device=device).manual_seed(i)) \
            if i % 2 else Sampler()
        return Request(prompts[i], 10 + 3 * i, sampler, {7}, logprobs=2 if i % 3 == 0 else None)

    rows, waiting = {}, list(range(len(prompts)))
    while waiting or decoder.rows:
        while waiting and len(decoder.rows) < 3:
            i = waiting.pop(0)
            rows[i] = decoder.join(request(i))
        decoder.step()
        decoder.leave([row for row in decoder.rows if row.done])
    for i, prompt in enumerate(prompts):
        sampling = dict(do_sample=True, temperature=0.8, top_p=0.9, seed=i) if i % 2 else {}
        out = generate(model, torch.tensor([prompt], device=device), max_new_tokens=10 + 3 * i, eos_token_id=7,
                       engine="static", **sampling)
        count = int((out.iter_counts[0] > 0).sum())
        assert rows[i].tokens == out.sequences[0, len(prompt):len(prompt) + count].tolist(), i
        assert rows[i].passes == out.iter_counts[0, :count].tolist(), i
        assert len(rows[i].logprobs) == (count if i % 3 == 0 else 0)


def test_static_server_rows_with_graphs_equal_their_solo_runs():
    check_static_server_rows_with_graphs_equal_their_solo_runs(CUDA)
