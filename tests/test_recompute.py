"""The lean recompute (llmft.recompute) inside llmft's checkpoint function (llmft.activation_offload) gives plain
checkpointing's loss and gradients, for full training and LoRA, with the MLP really run in chunks and the down
projection's product really skipped; it stays out of MLPs that draw random numbers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import llmft.recompute as recompute
from llmft.activation_offload import install_offloaded_checkpointing
from llmft.recompute import lean_recompute_for

LAYERS, TOKENS = 3, 2 * 17


def _model(lora_dropout: float | None = None):
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if lora_dropout is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules="all-linear")
        model = get_peft_model(model, lora)
        for name, p in model.named_parameters():  # non-zero B, so that every adapter gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def _loss_and_grads(model):
    torch.manual_seed(123)
    ids = torch.randint(0, 256, (2, TOKENS // 2))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("offload", [False, True], ids=["kept", "offloaded"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_lean_recompute_gives_plain_checkpointings_gradients(monkeypatch, lora, offload):
    plain_loss, plain = _loss_and_grads(_model(0.0 if lora else None))
    monkeypatch.setattr(recompute, "CHUNK_TOKENS", 5)  # 34 tokens: 7 chunks, the last shorter
    dense_weights = []
    dense_weight = recompute._dense_weight
    monkeypatch.setattr(recompute, "_dense_weight", lambda base: dense_weights.append(base) or dense_weight(base))
    model = _model(0.0 if lora else None)
    assert install_offloaded_checkpointing(model, offload=offload, lean=True) == LAYERS
    loss, grads = _loss_and_grads(model)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain.keys() and len(grads) > 0
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # the down projection's gradient came from its weight once per chunk: its forward product was skipped there
    assert len(dense_weights) == LAYERS * 7
    assert all(base.out_features == 64 and base.in_features == 128 for base in dense_weights)


def test_mlp_with_dropout_is_recomputed_as_usual():
    model = _model(0.1)
    layers = model.base_model.model.model.layers
    assert all(lean_recompute_for(layer) is None for layer in layers)
    assert all(lean_recompute_for(layer) is not None for layer in _model(0.0).base_model.model.model.layers)


def test_gradient_only_4bit_linear_matches_bitsandbytes():
    """The down projection's skipped product on a 4-bit base: the input gradient bitsandbytes' own backward gives."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(48, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict({"weight": torch.randn(32, 48)})
    base = base.to("cpu")
    if not hasattr(base.weight, "quant_state") or base.weight.quant_state is None:
        base.weight = bnb.nn.Params4bit(base.weight.data, requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert recompute._is_bnb_4bit(base) and recompute._gradient_only_base(base) is base
    x = torch.randn(5, 48, requires_grad=True)
    grad = torch.randn(5, 32)
    base(x).backward(grad)
    expected, x.grad = x.grad.clone(), None
    recompute._gradient_only_forward(base, x).backward(grad)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_offloaded_prefetched_lean_recompute_on_cuda_gives_plain_gradients():
    """On CUDA the offloaded inputs come back on the side stream one layer ahead (prefetch): same gradients."""

    def run(install: bool):
        model = _model(0.0).cuda()
        if install:
            assert install_offloaded_checkpointing(model, offload=True, lean=True) == LAYERS
        torch.manual_seed(123)
        ids = torch.randint(0, 256, (2, TOKENS // 2), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = run(False)
    loss, grads = run(True)
    assert loss == pytest.approx(plain_loss, rel=1e-3)
    assert grads.keys() == plain.keys() and len(grads) > 0
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=2e-2, atol=2e-3, msg=name)
