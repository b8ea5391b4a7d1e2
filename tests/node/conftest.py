"""The real node's tests: the operator's own pods run by a real kubelet with containerd and runc
from the images `make images` built. `make test-node` starts the control plane with no kwok
nodes, joins the real node (tests/cluster/node.sh) and runs these with KUBECONFIG set.

Each test module gets its own namespace (Pod Security `restricted` enforced, as a careful
cluster admin would), the example datasets as the ConfigMap the example names, a hostPath
volume holding the SmolLM2 GGUF, and an operator process on this machine watching only it.
"""

import pytest

from kube import open_bed


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = open_bed(tmp_path_factory.mktemp("volumes"))
    yield bed
    bed.close()
