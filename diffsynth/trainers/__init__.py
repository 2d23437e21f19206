from .args import build_parser, parse_args
from .trainer import Trainer, main

__all__ = ["Trainer", "build_parser", "main", "parse_args"]
