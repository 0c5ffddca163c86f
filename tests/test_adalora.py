"""AdaLoRA → plain factors: the converted (A, B) reproduce peft's own delta, pruned ranks removed."""

from __future__ import annotations

import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import AdaLoraLayer

from flora.lora.adalora import effective_ranks, extract_adalora_factors
from flora.lora.aggregate import aggregate


def test_converted_factors_reproduce_peft_delta_after_pruning(tiny_model):
    config = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                           total_step=10, tinit=1, tfinal=1)
    model = get_peft_model(tiny_model, config)
    generator = torch.Generator().manual_seed(0)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)]
    with torch.no_grad():
        for i, (_, module) in enumerate(layers):
            for param in (module.lora_A["default"], module.lora_B["default"], module.lora_E["default"]):
                param.copy_(torch.randn(param.shape, generator=generator))
            module.lora_E["default"][: i % 4] = 0.0  # the rank allocator's pruning: zeroed singular values
    factors = extract_adalora_factors(model)
    assert len(factors) == len(layers)
    for i, (name, module) in enumerate(layers):
        layer = name.removeprefix("base_model.model.")
        A, B = factors[layer]
        expected = module.get_delta_weight("default").detach()
        assert A.shape[0] == 6 - i % 4  # effective rank: non-pruned entries only
        assert float((B @ A - expected).norm()) <= 1e-5 * float(expected.norm())
    assert sorted(set(effective_ranks(factors).values())) == sorted({6 - i % 4 for i in range(len(layers))})
    # two AdaLoRA clients with different effective ranks stack exactly
    other = {k: (A[:1], B[:, :1]) for k, (A, B) in factors.items()}
    result = aggregate("flora", [factors, other], [0.5, 0.5])
    for layer, (A, B) in factors.items():
        reference = 0.5 * B @ A + 0.5 * other[layer][1] @ other[layer][0]
        assert float((result.delta(layer) - reference).norm()) <= 1e-5 * float(reference.norm())
