"""Loss / learning-rate curve as a PNG next to the LoRA (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from library.training.atomic import atomic_file


def plot_loss_lr(history: list[tuple[int, float, float]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    loss = [h[1] for h in history]
    lr = [h[2] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    marker = "o" if len(steps) < 20 else None  # a short run's few points stay visible
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, label="loss", marker=marker)
    if len(loss) >= 5:
        k = max(2, len(loss) // 20)
        smooth = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, color="tab:blue", label="loss (moving mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, lr, color="tab:orange", label="lr", marker=marker)
    ax2.set_ylabel("learning rate")
    ax.set_title(title)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
