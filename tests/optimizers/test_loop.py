"""What an optimizer asks of the training loop, through LoopNeeds: Hessian passes, metrics, setup warnings."""

from __future__ import annotations

import torch

from library.optimizers.hina_adamw import HinaAdamWOptimizer
from library.optimizers.loop import LoopNeeds
from library.optimizers.sophia import SophiaG


def _param():
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.grad = torch.full((4, 4), 0.5)
    return p


def test_sophia_asks_for_a_hessian_pass_every_k_steps_and_gets_it():
    p = _param()
    opt = SophiaG([p], lr=1e-3, hessian_update_interval=3)
    needs = LoopNeeds(opt)
    assert [s for s in range(1, 10) if needs.hessian_due(s)] == [3, 6, 9]
    opt.step()
    before = opt.state[p]["hessian"].clone()
    needs.update_hessian(batch_size=2)
    assert not torch.equal(opt.state[p]["hessian"], before)
    assert not any(LoopNeeds(torch.optim.AdamW([p])).hessian_due(s) for s in range(1, 20))


def test_metrics_are_the_optimizers_own_under_optimizer_prefix():
    p = _param()
    hina = HinaAdamWOptimizer([p], lr=1e-3, weight_decay=0.1)
    logs = LoopNeeds(hina).metrics()
    assert logs["optimizer/weight_decay_current"] == 0.1 and logs["optimizer/wd_ratio"] == 1.0
    assert LoopNeeds(torch.optim.AdamW([p])).metrics() == {}


def test_custom_adamw_warns_when_alora_and_a_network_lora_plus_ratio_both_scale_lora_up():
    p = _param()
    assert len(LoopNeeds(HinaAdamWOptimizer([p])).setup_warnings(["loraplus_lr_ratio=16"])) == 1
    assert LoopNeeds(HinaAdamWOptimizer([p], use_alora=False)).setup_warnings(["loraplus_lr_ratio=16"]) == []
    assert LoopNeeds(HinaAdamWOptimizer([p])).setup_warnings(["conv_dim=4"]) == []
    assert LoopNeeds(torch.optim.AdamW([p])).setup_warnings(["loraplus_lr_ratio=16"]) == []
