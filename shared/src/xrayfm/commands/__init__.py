"""The `xrayfm` sub-commands, the top layer of the library: thin argparse shells over the layers below.

One module per area (``data``, ``train``, ``explain``, ``demo``), each exposing
``register(subparsers)``; :mod:`xrayfm.cli` collects them. A module here imports only what building its
parsers needs (argparse and the torch-free config dataclasses); each handler imports its heavy modules
when it runs, so ``xrayfm --help`` and ``xrayfm COMMAND --help`` never load torch.

Nothing below this package imports it: commands and drivers that combine several layers (e.g. the
faithfulness table of ``xrayfm explain-eval``, which needs :mod:`xrayfm.inference`) live here.
"""
