"""Packed samples stay apart under llmft's variable-length attention (llmft.attention): the boundaries the collator
hands over, the wrapper around PyTorch's varlen kernel (on the CPU with a per-sample SDPA standing in for the CUDA
kernel), and on a GPU the real kernel inside a Qwen2 model: a packed row's loss and gradients equal those of its
samples run one at a time."""

import pytest
import torch
import torch.nn.functional as F

import llmft.attention as attention
from llmft.data.packing import PackedCollator
from llmft.data.render import IGNORE_INDEX


def test_collator_hands_over_each_samples_offsets_and_the_padding_as_one_more_sample():
    collator = PackedCollator(pad_token_id=0, pad_to_multiple_of=8, sample_boundaries=True)
    batch = collator([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    # the boundaries derived on the device from the positions alone are the same
    offsets, longest = attention.sample_boundaries(batch["position_ids"])
    assert offsets.tolist() == [0, 3, 5, 8] and longest == 3


def test_collator_without_boundaries_adds_no_keys():
    batch = PackedCollator(pad_token_id=0)([{"input_ids": [5, 6], "labels": [5, 6]}])
    assert set(batch) == {"input_ids", "labels", "position_ids"}


def _per_sample_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    assert window_size == (-1, 0), "the wrapper must ask for causal attention"
    bounds = cu_q.tolist()
    out = []
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa))
    return torch.cat([o[0].transpose(0, 1) for o in out])


@pytest.mark.parametrize("boundaries_from", ["batch", "position_ids"])
def test_wrapper_attends_within_each_sample_only(monkeypatch, boundaries_from):
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: _per_sample_sdpa)
    monkeypatch.setattr(attention, "_kernel_parameters", lambda: frozenset({"scale", "window_size", "enable_gqa"}))
    torch.manual_seed(0)
    lengths = [4, 1, 3, 5]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    q, k, v = torch.randn(1, 4, 13, 8), torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    extra = {"position_ids": positions}
    if boundaries_from == "batch":
        extra.update(cu_seq_lens_q=torch.tensor([0, 4, 5, 8, 13], dtype=torch.int32), max_length_q=5)
    out, weights = attention.varlen_attention_forward(None, q, k, v, None, scaling=0.3, **extra)
    assert weights is None and out.shape == (1, 13, 4, 8)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = F.scaled_dot_product_attention(
            q[:, :, part], k[:, :, part], v[:, :, part], is_causal=True, scale=0.3, enable_gqa=True
        )
        torch.testing.assert_close(out[:, part], alone.transpose(1, 2), rtol=1e-5, atol=1e-6)
        start += n


def test_wrapper_refuses_a_mask_and_attention_dropout():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="without an attention mask"):
        attention.varlen_attention_forward(None, q, q, q, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="dropout"):
        attention.varlen_attention_forward(None, q, q, q, None, dropout=0.1)


def _qwen2(attn: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.cuda()


def _grads(model):
    return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}


def _packed_and_alone(attn: str, lengths: list[int], boundaries: bool):
    """Sum of per-sample losses (token-summed) and gradients: one packed row through `attn`, and each sample alone
    through SDPA."""
    attention.register_varlen_attention()
    torch.manual_seed(1)
    samples = [torch.randint(1, 512, (n,)).tolist() for n in lengths]
    collator = PackedCollator(pad_token_id=0, sample_boundaries=boundaries)
    batch = collator([{"input_ids": s, "labels": s} for s in samples])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    labels = batch.pop("labels")

    def summed_loss(model, inputs, target):
        logits = model(**inputs).logits.float()
        return F.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")

    model = _qwen2(attn, torch.bfloat16)
    packed = summed_loss(model, batch, labels)
    packed.backward()
    packed_grads = _grads(model)

    reference = _qwen2("sdpa", torch.bfloat16)
    alone = 0.0
    for s in samples:
        ids = torch.tensor([s], device="cuda")
        loss = summed_loss(reference, {"input_ids": ids}, ids)
        loss.backward()
        alone += loss.item()
    return packed.item(), packed_grads, alone, _grads(reference)


def _relative(a: dict, b: dict) -> float:
    num = sum((a[n] - b[n]).norm() ** 2 for n in a) ** 0.5
    den = sum(b[n].norm() ** 2 for n in b) ** 0.5
    return float(num / den)


@pytest.mark.gpu
@pytest.mark.parametrize("boundaries", [True, False], ids=["from-collator", "from-positions"])
def test_varlen_packed_row_equals_samples_one_at_a_time_on_gpu(boundaries):
    if not attention.varlen_available():
        pytest.skip("this PyTorch or GPU has no varlen flash kernel")
    lengths = [700, 33, 1, 250, 1024]
    packed, packed_grads, alone, alone_grads = _packed_and_alone(attention.VARLEN, lengths, boundaries)
    # bf16 models on both sides: they agree to bf16's rounding, far inside what a leak across samples moves
    assert packed == pytest.approx(alone, rel=2e-3)
    assert _relative(packed_grads, alone_grads) < 2e-2


@pytest.mark.gpu
def test_the_gpu_comparison_catches_attention_across_samples():
    """The control: SDPA given a plain causal row (a mask that lets samples see each other) fails the tolerance."""
    if not attention.varlen_available():
        pytest.skip("this PyTorch or GPU has no varlen flash kernel")
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def leaky(module, q, k, v, mask, **kwargs):
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)

    AttentionInterface.register("llmft_test_leaky", leaky)
    packed, packed_grads, alone, alone_grads = _packed_and_alone("llmft_test_leaky", [700, 33, 1, 250, 1024], False)
    assert packed != pytest.approx(alone, rel=2e-3) or _relative(packed_grads, alone_grads) >= 2e-2
