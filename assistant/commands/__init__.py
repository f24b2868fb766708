"""The `lva` subcommands that run a model: each module adds its parser and runs it."""
