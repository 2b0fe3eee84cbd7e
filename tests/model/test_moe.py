"""Mixture-of-Experts: identical experts are the dense model, one expert per token, capacity, upcycling."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from medplib.config.base import merge
from medplib.model import MedPLIB, MoEFeedForward, parameter_counts

from .conftest import conversation


def _batch(tokenizer, n: int = 2) -> dict:
    ids, _ = tokenizer.encode_conversation(conversation("<image>\nIs this a CT image?", "yes"))
    torch.manual_seed(1)
    return {"input_ids": torch.tensor([ids] * n), "pixel_values": torch.randn(n, 3, 64, 64)}


def test_identical_experts_give_the_dense_output_and_each_token_uses_one_expert(tiny_model: MedPLIB, tokenizer):
    batch = _batch(tokenizer)
    dense_logits = tiny_model(**batch).logits
    moe = copy.deepcopy(tiny_model)
    moe.upcycle([tiny_model, tiny_model])  # both experts are copies of the same dense FFN
    moe.eval()
    seen = {}
    for i, layer in enumerate(moe.moe_layers()):
        for e, expert in enumerate(layer.experts):
            expert.register_forward_hook(lambda mod, args, out, key=(i, e): seen.__setitem__(key, args[0].shape[0]))
    moe_logits = moe(**batch).logits
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-5, rtol=0)

    n_tokens = batch["input_ids"].numel()
    for i, layer in enumerate(moe.moe_layers()):
        routed = layer.last_expert_index
        assert routed.shape == (n_tokens,)
        assert set(routed.unique().tolist()) == {0, 1}, "the random router should use both experts"
        # every token went through exactly one expert: the experts' inputs add up to the tokens
        assert seen[(i, 0)] + seen[(i, 1)] == n_tokens
        assert seen[(i, 0)] == int((routed == 0).sum())


def _moe_layer(capacity_factor_train: float, capacity_factor_eval: float = 2.0) -> MoEFeedForward:
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4)
    return MoEFeedForward([LlamaMLP(cfg), LlamaMLP(cfg)], 16, capacity_factor_train, capacity_factor_eval)


def test_capacity_drops_overflow_tokens_at_random_priority_in_training():
    torch.manual_seed(0)
    layer = _moe_layer(capacity_factor_train=1.0).train()
    torch.nn.init.zeros_(layer.router.weight)  # every token ties → expert 0, which takes 1.0 * 8 / 2 = 4
    x = torch.randn(1, 8, 16)
    dropped = []
    for _ in range(20):
        out = layer(x)
        kept = layer.last_expert_index == 0
        assert int(kept.sum()) == 4 and set(layer.last_expert_index.tolist()) == {0, -1}
        assert layer.last_drop_rate.item() == int((layer.last_expert_index == -1).sum()) / 8 == 0.5
        torch.testing.assert_close(out[0, kept], layer.experts[0](x[0, kept]))
        assert torch.equal(out[0, ~kept], torch.zeros(4, 16))
        dropped.append(tuple((~kept).nonzero().flatten().tolist()))
    # not the batch's last four every time: the drops move around and reach every position
    assert len(set(dropped)) > 5 and set(sum(dropped, ())) == set(range(8))
    layer.eval()(x)
    assert layer.last_expert_index.tolist() == [0] * 8  # eval capacity 2.0 * 8 / 2 = 8: nothing dropped
    assert layer.last_drop_rate.item() == 0.0


def test_evaluation_keeps_the_tokens_the_router_is_surest_of():
    layer = _moe_layer(capacity_factor_train=2.0, capacity_factor_eval=0.5).eval()  # 0.5 * 8 / 2 = 2 per expert
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 1.0, -1.0
    x = torch.zeros(1, 8, 16)
    x[0, :, 0] = torch.tensor([0.1, -0.5, 0.2, 0.9, -0.3, 0.8, -0.4, 0.05])  # sign: expert; size: confidence
    for _ in range(2):  # deterministic
        layer(x)
        assert layer.last_expert_index.tolist() == [-1, 1, -1, 0, -1, 0, 1, -1]
        assert layer.last_drop_rate.item() == 0.5


def test_the_stage_recipe_logs_the_moe_drop_rate(tiny_config, tokenizer):
    from medplib.config.base import to_dict
    from medplib.config.stages import tiny_stages
    from medplib.train.recipe import StageRecipe

    ids, labels = tokenizer.encode_conversation(conversation("<image>\nIs this a CT image?", "yes"))
    batch = {**_batch(tokenizer), "labels": torch.tensor([labels] * 2)}
    recipe = StageRecipe({"spec": to_dict(tiny_stages()[4]), "data_dir": "unused", "base": "unused"})
    torch.manual_seed(0)
    dense = MedPLIB(tiny_config, tokenizer).train()
    assert "moe_drop_rate" not in recipe.loss(dense, batch)[1]
    torch.manual_seed(0)  # each expert takes ceil(0.5 * tokens / 2): about half of the tokens are dropped
    moe = MedPLIB(merge(tiny_config, {"moe": {"num_experts": 2, "capacity_factor_train": 0.5}}), tokenizer).train()
    _, parts = recipe.loss(moe, batch)
    rates = [float((m.last_expert_index == -1).float().mean()) for m in moe.moe_layers()]
    n = batch["input_ids"].numel()
    assert min(rates) >= 1 - 2 * math.ceil(n / 4) / n > 0.45
    assert parts["moe_drop_rate"] == pytest.approx(sum(rates) / len(rates))


def test_load_balance_loss_and_router_gradient():
    torch.manual_seed(0)
    layer = _moe_layer(capacity_factor_train=2.0)
    x = torch.randn(1, 6, 16)
    torch.nn.init.zeros_(layer.router.weight)
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(1.0)  # uniform probabilities: the minimum, 1
    with torch.no_grad():  # push every token to expert 0 with p = sigmoid(2 * 1.1) for 2 experts
        layer.router.weight.zero_()
        x = torch.zeros(1, 6, 16)
        x[..., 0] = 1.0
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 1.1, -1.1
    out = layer(x)
    p0 = torch.sigmoid(torch.tensor(2.2)).item()
    assert layer.aux_loss.item() == pytest.approx(2 * p0, rel=1e-5)  # f = (1, 0), P = (p0, 1 - p0)
    out.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_upcycle_copies_grounding_then_vl_ffns(tiny_config, tokenizer):
    torch.manual_seed(1)
    grounding = MedPLIB(tiny_config, tokenizer)
    torch.manual_seed(2)
    vl = MedPLIB(tiny_config, tokenizer)
    base = copy.deepcopy(vl)
    base.upcycle([grounding, vl])
    assert base.config.moe.num_experts == 2 and vl.config.moe.num_experts == 1
    for layer, g_layer, v_layer in zip(base.layers, grounding.layers, vl.layers):
        assert torch.equal(layer.mlp.experts[0].up_proj.weight, g_layer.mlp.up_proj.weight)
        assert torch.equal(layer.mlp.experts[1].down_proj.weight, v_layer.mlp.down_proj.weight)
    with pytest.raises(ValueError, match="already has 2 experts"):
        base.upcycle([grounding, vl])


def test_moe_model_saves_and_loads(tiny_config, tokenizer, tmp_path):
    cfg = merge(tiny_config, {"moe": {"num_experts": 2}})
    torch.manual_seed(0)
    model = MedPLIB(cfg, tokenizer).eval()
    loaded = MedPLIB.from_pretrained(model.save_pretrained(tmp_path / "moe")).eval()
    assert len(loaded.moe_layers()) == tiny_config.llm.num_layers
    batch = _batch(tokenizer)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    counts = parameter_counts(model)
    ffn = sum(p.numel() for p in model.layers[0].mlp.experts[0].parameters())
    assert counts["total"] - counts["active"] == ffn * tiny_config.llm.num_layers


def test_stage4_streamed_from_the_saved_grounding_model_equals_the_in_memory_upcycle(tiny_config, tokenizer,
                                                                                      tmp_path):
    """`upcycle_from_saved` (stage IV as the recipe builds it, never holding the grounding model) gives exactly the
    weights of the in-memory way: expert 0 = grounding FFNs, expert 1 = VL FFNs, SAM + text_hidden_fcs from
    grounding, everything else from the VL model, the same routers for the same seed."""
    from medplib.config.stages import tiny_stages
    from medplib.train.recipe import build_stage_model

    torch.manual_seed(1)
    grounding = MedPLIB(tiny_config, tokenizer)
    torch.manual_seed(2)
    vl = MedPLIB(tiny_config, tokenizer)
    g_dir, vl_dir = grounding.save_pretrained(tmp_path / "stage3"), vl.save_pretrained(tmp_path / "stage2")

    torch.manual_seed(3)
    expected = copy.deepcopy(vl)
    expected.upcycle([grounding, vl])
    expected.sam.load_state_dict(grounding.sam.state_dict())
    expected.text_hidden_fcs.load_state_dict(grounding.text_hidden_fcs.state_dict())
    streamed = MedPLIB.from_pretrained(vl_dir)
    torch.manual_seed(3)
    streamed.upcycle_from_saved(g_dir)
    want, got = expected.state_dict(), streamed.state_dict()
    assert sorted(got) == sorted(want) and streamed.config.moe.num_experts == 2
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert not torch.equal(streamed.layers[0].mlp.experts[0].up_proj.weight, vl.layers[0].mlp.up_proj.weight)

    torch.manual_seed(3)
    built = build_stage_model(tiny_stages()[4], vl_dir, g_dir)  # what stage IV's workers build (LoRA on top)
    assert len(built.moe_layers()) == tiny_config.llm.num_layers
    with pytest.raises(ValueError, match="already has 2 experts"):
        streamed.upcycle_from_saved(g_dir)
    other = MedPLIB(merge(tiny_config, {"llm": {"intermediate_size": 96}}), tokenizer)
    with pytest.raises(ValueError, match="has another LLM config than this model's"):
        other.upcycle_from_saved(g_dir)


def test_a_saved_model_loads_in_bf16_and_names_a_file_that_does_not_fit(tiny_config, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = MedPLIB(tiny_config, tokenizer)
    folder = model.save_pretrained(tmp_path / "m")
    half = MedPLIB.from_pretrained(folder, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    torch.testing.assert_close(half.llm.lm_head.weight.float(), model.llm.lm_head.weight, atol=1e-2, rtol=1e-2)
    exact = MedPLIB.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(exact.state_dict()[name], tensor), name

    from safetensors.torch import load_file, save_file

    from medplib.model.model import CHECKSUMS_FILE, WEIGHTS_FILE

    weights = load_file(folder / WEIGHTS_FILE)
    weights.pop("projector.0.weight")
    save_file(weights, folder / WEIGHTS_FILE)
    (folder / CHECKSUMS_FILE).unlink()
    with pytest.raises(ValueError, match=r"safetensors does not fit the config: missing \['projector.0.weight'\]"):
        MedPLIB.from_pretrained(folder)
