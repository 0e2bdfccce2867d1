"""The profiler benches need CUDA: on a CPU machine they import cleanly and stop with one line and exit code 2."""

import pytest
import torch

from bench import profile_optimizer, profile_step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
@pytest.mark.parametrize(("module", "argv"), [(profile_step, ["--configs", "baseline"]),
                                               (profile_optimizer, ["CustomAdamW"])])
def test_profile_benches_refuse_without_cuda(module, argv, capsys):
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs CUDA" in err[0]
