"""sd-scripts' command-line options, one module per area; each module's `add_arguments(parser)` adds its group.

`library/cli.py` builds the one parser from these; keeping each area apart keeps its options beside the code that
reads them.
"""


def refusals() -> dict[str, str]:
    """Option name -> why it stops a run in one line here, from each area module's optional `REFUSALS`."""
    from library.flags import captions, images, models_saving, objective, run, sampling

    out: dict[str, str] = {}
    for module in (objective, captions, images, run, models_saving, sampling):
        out.update(getattr(module, "REFUSALS", {}))
    return out
