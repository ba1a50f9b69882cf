"""A multi-node Ray cluster on one machine, for tests and bench/multinode.py.

``ray.cluster_utils.Cluster`` starts a head node and worker nodes as separate raylets
(loopback only). The custom resource ``fake_gpu`` stands in for ``GPU``: the model
deployment asks for ``resources: {fake_gpu: 1}`` and so lands only on "GPU" nodes,
exactly like ``num_gpus: 1`` on a real cluster. The store is S3 on moto's standalone
server, reachable from every node as on a real cluster (no shared local disk).

    with SimulatedCluster(gpu_nodes=2) as sim:
        url = sim.deploy(sim.app_args(runner="cluster_runners:cluster_runner"))
        ...
        sim.remove_node(node_id)
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
#: Custom resource standing in for a GPU.
FAKE_GPU = "fake_gpu"
#: Custom resource of the head node (the ingress is pinned there, like a CPU node group).
HEAD = "head"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimulatedCluster:
    """Head (CPU, ingress + Serve controller + proxy) and ``gpu_nodes`` fake-GPU workers, S3 on moto."""

    def __init__(self, gpu_nodes: int = 2, *, cpus_per_gpu_node: int = 1, head_cpus: int = 1):
        self.gpu_nodes = gpu_nodes
        self.cpus_per_gpu_node = cpus_per_gpu_node
        self.head_cpus = head_cpus
        self.cluster = None
        self.moto = None
        self.s3_url = ""
        self.url = ""
        self.workers: dict[str, object] = {}

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> SimulatedCluster:
        from moto.server import ThreadedMotoServer
        from ray.cluster_utils import Cluster

        # Every node process inherits this environment: credentials for moto, the repo on the path.
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        paths = [str(REPO), str(REPO / "tests")]
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
        sys.path[:0] = [p for p in paths if p not in sys.path]
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
        port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.moto.start()
        self.s3_url = f"http://127.0.0.1:{port}"
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": self.head_cpus, "resources": {HEAD: 1}, "include_dashboard": False},
        )
        for _ in range(self.gpu_nodes):
            self.add_gpu_node()
        import ray

        ray.init(address=self.cluster.address, log_to_driver=False)
        self.cluster.wait_for_nodes()
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()
            self.moto.stop()

    def add_gpu_node(self):
        node = self.cluster.add_node(num_cpus=self.cpus_per_gpu_node, resources={FAKE_GPU: 1})
        self.workers[node.node_id] = node
        return node

    def remove_node(self, node_id: str) -> None:
        """Kill a worker node (raylet and its workers) as a lost machine would disappear."""
        node = self.workers.pop(node_id)
        self.cluster.remove_node(node, allow_graceful=False)

    # ------------------------------------------------------------ the app

    def app_args(self, *, bucket: str = "recon3d-sim", runner: str, **overrides) -> dict:
        """AppArgs for the simulated cluster: S3 store, fake-GPU model, ingress on the head."""
        model = {
            "name": "fusion",
            "num_cpus": 1,
            "num_gpus": 0,
            "resources": {FAKE_GPU: 1},
            "runner": runner,
            "graceful_shutdown_timeout_s": 2,
            "autoscaling": {
                "min_replicas": 0,
                "initial_replicas": 1,
                "max_replicas": self.gpu_nodes,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 3.0,
                "downscale_to_zero_delay_s": 5.0,
            },
        }
        model.update(overrides.pop("model", {}))
        args = {
            "store": {
                "kind": "s3",
                "bucket": bucket,
                "prefix": "svc",
                "endpoint_url": self.s3_url,
                "region": "us-east-1",
                "create_bucket": True,
            },
            "models": [model],
            "default_preset": "fast",
            "fanout": False,
            "validate_pixels": False,
            "job_timeout_s": 120,
            "max_queued_jobs": 100,
            "ingress_num_cpus": 0,
            "ingress_resources": {HEAD: 0.01},
            "drain_timeout_s": 5,
        }
        args.update(overrides)
        return args

    def deploy(self, args: dict, *, timeout_s: float = 180.0) -> str:
        """serve.run the app (proxy on the head only: every node shares 127.0.0.1); returns its URL."""
        from ray import serve

        from serve_app.builder import build_app

        if not self.url:
            port = free_port()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            self.url = f"http://127.0.0.1:{port}"
        serve.run(build_app(args), name="recon3d", route_prefix="/", blocking=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the app did not become ready")

    @staticmethod
    def model_replicas(state: str = "RUNNING") -> int:
        """Replicas of the fusion deployment in ``state``."""
        from ray import serve

        d = serve.status().applications["recon3d"].deployments["fusion-model"]
        return int((d.replica_states or {}).get(state, 0))

    @staticmethod
    def replica_nodes() -> list[str]:
        """Node ids of the alive fusion-model replica actors (read from the GCS: no dashboard needed)."""
        from ray._private.state import actors

        return [
            a["Address"]["NodeID"]
            for a in actors().values()
            if a["State"] == "ALIVE" and "fusion-model" in a.get("ActorClassName", "")
        ]
