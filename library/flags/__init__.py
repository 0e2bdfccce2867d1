"""sd-scripts' command-line options, one module per area; each module's `add_arguments(parser)` adds its group.

`library/cli.py` builds the one parser from these; keeping each area apart keeps its options beside the code that
reads them.
"""
