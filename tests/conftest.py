"""Test setup: pinned threads, seeds, and a `device` parameter (cpu, plus cuda when usable)."""
import os
import sys

import pytest
import torch

import rapidquant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/_models.py

# The CI machine has 2 shared cores: use both (exercises the OpenMP paths) but no more.
torch.set_num_threads(int(os.environ.get("RAPIDQUANT_TEST_THREADS", "2")))

CUDA_OK = torch.cuda.is_available() and rapidquant.build_info()["with_cuda"]
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of rapidquant._C")
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip)


def pytest_report_header(config):
    info = rapidquant.build_info()
    return (f"rapidquant {info['version']} from {os.path.dirname(rapidquant.__file__)}; "
            f"with_cuda={info['with_cuda']} with_openmp={info['with_openmp']} "
            f"archs={info['cuda_archs']}; cuda usable={CUDA_OK}; torch threads={torch.get_num_threads()}")
