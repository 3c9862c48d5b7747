"""The handlers of the `maetok` subcommands, one module per command group. `maetok.cli` builds the parser and
imports a handler's module only once the arguments are parsed (`maetok --help` need not import torch)."""
