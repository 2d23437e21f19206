"""The command-line parser of every script: argparse, with a bad flag reported in one line.

argparse's own `error()` prints the whole usage (some 60 lines for the trainer) above the one line that says what is
wrong; here that line is all, and `--help` still lists every flag. Exit code 2, as argparse.
`--help` states every default a flag applies without being asked (a value other than None or a switch's False)
where the flag's own help text does not already say it.
"""
import argparse


def states_default(action) -> bool:
    """Whether --help needs no "(default ...)" for this flag: it has no value-like default, or its text gives it."""
    default = action.default
    if action.help == argparse.SUPPRESS or default is None or default == argparse.SUPPRESS:
        return True
    if isinstance(default, bool) or default == [] or not action.option_strings:
        return True
    return "default" in (action.help or "").lower()


class ArgumentParser(argparse.ArgumentParser):
    def format_help(self):
        for action in self._actions:
            if not states_default(action):
                shown = "%(default)r" if isinstance(action.default, str) else "%(default)s"
                action.help = f"{action.help} (default {shown})" if action.help else f"default {shown}"
        return super().format_help()

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")
