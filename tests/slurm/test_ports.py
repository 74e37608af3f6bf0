"""Ports of local runs never collide by construction: rendezvous ports come from the OS, and
each local Slurm cluster numbers its jobs (whose ports derive from their ids) in its own block."""

from __future__ import annotations

import socket

from mmdit.distributed import free_ports
from slurm.local_cluster import pick_first_job_id
from tests.slurm.conftest import job_port


def block_ids(first: int) -> range:
    return range(first, first + 100)


def every_block() -> set[int]:
    """First ids of clusters started one after another, each seeing the ones before it."""
    taken: set[int] = set()
    for _ in range(126):
        taken.add(pick_first_job_id(taken))
    return taken


def test_a_new_cluster_takes_a_block_no_running_cluster_has():
    blocks = every_block()
    assert len(blocks) == 126  # each pick avoided every block taken before it
    assert all(first % 100 == 1 for first in blocks)
    assert pick_first_job_id(blocks - {4201}) == 4201  # the one block left
    # With every block taken it still returns a valid block rather than failing.
    assert pick_first_job_id(blocks) in blocks


def test_job_ports_of_every_block_stay_below_the_ephemeral_range_and_differ():
    ports = [{job_port(i) for i in block_ids(first)} for first in every_block()]
    assert all(min(p) >= 20000 and max(p) < 32768 for p in ports)
    assert len(set().union(*ports)) == 126 * 100  # no port in two blocks


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
