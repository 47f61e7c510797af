"""A multi-node Ray cluster on this machine for tests (Ray's own multi-node test utility).

Run as a process: prints one JSON line {"address", "nodes": {label: node_id}}, then obeys commands
on stdin: ``kill <label>`` removes that node (kills its raylet and workers), ``exit`` shuts down.
Nodes: ``head`` (0 CPUs: trials never run there), ``cpu`` (1 CPU), ``gpu`` (1 CPU, 1 logical GPU).
"""
import json
import sys

from ray.cluster_utils import Cluster


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    nodes = {"head": cluster.head_node}
    nodes["cpu"] = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    nodes["gpu"] = cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "nodes": {k: n.node_id for k, n in nodes.items()}}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["kill"]:
            cluster.remove_node(nodes.pop(cmd[1]), allow_graceful=False)
            print(json.dumps({"killed": cmd[1]}), flush=True)
        elif cmd[:1] == ["exit"]:
            break
    cluster.shutdown()


if __name__ == "__main__":
    main()
