"""--overwrite moves an earlier run's outputs aside, so the new run's files never mix with them."""

from __future__ import annotations

from library.training.entry import main
from tests.training.conftest import train_argv


def test_overwrite_moves_the_earlier_runs_files_aside(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2\n", encoding="utf-8")
    sampled = ("--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--save_every_n_steps", "1")
    assert main(train_argv(tiny_dataset, out, *sampled, steps=2)) == 0
    first_samples = sorted(p.name for p in (out / "sample").glob("t_0*.png"))
    assert len(first_samples) == 2 and (out / "t-step00000001.safetensors").is_file()
    (out / "other.safetensors").write_bytes(b"another run's file")

    assert main(train_argv(tiny_dataset, out, "--overwrite", "--sample_prompts", str(prompts),
                           "--sample_every_n_steps", "1", steps=1)) == 0
    earlier = [p for p in out.iterdir() if p.name.startswith("earlier-t-")]
    assert len(earlier) == 1
    moved = {p.relative_to(earlier[0]).as_posix() for p in earlier[0].rglob("*") if p.is_file()}
    assert {"t.safetensors", "t-step00000001.safetensors", "t_loss.csv", "t_loss.png"} <= moved
    assert {f"sample/{name}" for name in first_samples} <= moved
    assert sorted(p.name for p in (out / "sample").glob("t_0*.png")) == ["t_000001_00_a_red_circle.png"]
    assert not (out / "t-step00000001.safetensors").exists()  # the new run saved no step checkpoint
    assert (out / "other.safetensors").read_bytes() == b"another run's file"  # another name is not touched
