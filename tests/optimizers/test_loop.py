"""What an optimizer asks of the training loop, through LoopNeeds: Hessian passes, metrics, its own schedule, warnings."""

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


def test_metrics_log_each_groups_lr_d_times_lr_where_adapted_and_the_optimizers_own():
    p, q = _param(), _param()
    sgd = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [q], "lr": 0.2}])
    sgd.param_groups[1]["d"] = 3.0  # D-Adaptation / Prodigy keep their estimate here
    assert LoopNeeds(sgd).metrics() == {"lr/group0": 0.1, "lr/group1": 0.2, "lr/d*lr/group1": 0.2 * 3.0}
    hina = HinaAdamWOptimizer([p], lr=1e-3, weight_decay=0.1)
    logs = LoopNeeds(hina).metrics()
    assert logs["lr/group0"] == 1e-3 and logs["optimizer/weight_decay_current"] == 0.1


def test_adafactor_with_relative_step_brings_its_schedule_and_others_do_not():
    from transformers.optimization import Adafactor, AdafactorSchedule

    p = torch.nn.Parameter(torch.ones(4, 4))  # no gradient yet, as when the loop builds its schedule
    relative = Adafactor([p], lr=None, relative_step=True, scale_parameter=True, warmup_init=False)
    assert isinstance(LoopNeeds(relative).lr_scheduler(), AdafactorSchedule)
    assert LoopNeeds(Adafactor([p], lr=1e-3, relative_step=False)).lr_scheduler() is None
    assert LoopNeeds(torch.optim.AdamW([p])).lr_scheduler() is None


def test_custom_adamw_warns_when_alora_and_a_network_lora_plus_ratio_both_scale_lora_up():
    p = _param()
    assert len(LoopNeeds(HinaAdamWOptimizer([p])).setup_warnings(["loraplus_lr_ratio=16"])) == 1
    assert LoopNeeds(HinaAdamWOptimizer([p], use_alora=False)).setup_warnings(["loraplus_lr_ratio=16"]) == []
    assert LoopNeeds(HinaAdamWOptimizer([p])).setup_warnings(["conv_dim=4"]) == []
    assert LoopNeeds(torch.optim.AdamW([p])).setup_warnings(["loraplus_lr_ratio=16"]) == []
