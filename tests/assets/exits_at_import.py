"""A factory file that parses its own arguments at import, as a training script does
(here a required one, so that it exits whatever the test process's own arguments)."""

import argparse

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.parse_args([])


def model() -> torch.nn.Module:
    return torch.nn.Linear(8, 3)
