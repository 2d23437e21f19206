"""The command-line parser of every script: argparse, with a bad flag reported in one line.

argparse's own `error()` prints the whole usage (some 60 lines for the trainer) above the one line that says what is
wrong; here that line is all, and `--help` still lists every flag. Exit code 2, as argparse.
"""
import argparse


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")
