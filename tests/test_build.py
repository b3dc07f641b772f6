import os

import pytest

import rapidquant
from rapidquant import _ext


def test_build_info_reports_backends():
    info = rapidquant.build_info()
    assert set(info) >= {"version", "with_cuda", "with_openmp", "cuda_archs"}
    assert info["version"] == rapidquant.__version__
    assert isinstance(info["with_cuda"], bool) and isinstance(info["with_openmp"], bool)
    if info["with_cuda"]:
        check_cuda_archs(info["cuda_archs"])


def check_cuda_archs(archs):
    """The default build (cmake/FindCudaCompiler.cmake) has SASS ("NN-real") for every arch and
    PTX ("NN-virtual") for the newest, so future GPUs can JIT. A user-set
    CMAKE_CUDA_ARCHITECTURES of plain numbers ("80;90") embeds both SASS and PTX for each."""
    assert archs, "a CUDA build must list its architectures"
    nums = {}
    for a in archs:
        num, _, kind = a.partition("-")
        assert num.isdigit() and kind in ("", "real", "virtual"), f"unexpected CUDA arch entry {a!r}"
        nums.setdefault(kind, []).append(int(num))
    if "" not in nums:  # suffixed entries only: some SASS, and PTX for the newest SASS arch
        assert nums.get("real"), f"no SASS architecture in {archs}"
        assert max(nums.get("virtual", [0])) >= max(nums["real"]), \
            f"no PTX for the newest architecture in {archs}: newer GPUs could not run the kernels"


@pytest.mark.parametrize("archs,ok", [
    (["75-real", "80-real", "90-real", "90-virtual"], True),
    (["80", "90"], True),
    (["75-real", "90-real", "80-virtual"], False),  # PTX is older than the newest SASS
    (["75-real", "90-real"], False),                 # no PTX at all
    (["90-virtual"], False),                         # PTX only: every launch would JIT
    ([], False),
    (["sm_90"], False),
])
def test_cuda_arch_check_rejects_bad_lists(archs, ok):
    if ok:
        check_cuda_archs(archs)
    else:
        with pytest.raises(AssertionError):
            check_cuda_archs(archs)


def test_tests_use_installed_package_not_source_tree():
    # tests/ must exercise what pip installed; the source tree has no compiled _C.
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(os.path.dirname(here), "python", "rapidquant")
    installed = os.path.dirname(os.path.abspath(rapidquant.__file__))
    if os.environ.get("RAPIDQUANT_EDITABLE") != "1":
        assert os.path.realpath(installed) != os.path.realpath(src)


def test_missing_cuda_backend_names_the_build_option(monkeypatch):
    monkeypatch.setattr(_ext._C, "with_cuda", False, raising=False)
    with pytest.raises(RuntimeError, match="RAPIDQUANT_ENABLE_CUDA=ON"):
        _ext.require_cuda("rapidquant::quantize_dequantize")


@pytest.mark.skipif(os.environ.get("RAPIDQUANT_EXPECT_CUDA") != "1", reason="CI sets this when nvcc exists")
def test_ci_build_has_cuda_kernels():
    assert rapidquant.build_info()["with_cuda"], "nvcc was present but the CUDA kernels were not built"
