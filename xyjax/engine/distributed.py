"""Multi-process engines (``jax.distributed``): process 0 owns the scheduler, the planner and the requests; every
process holds its devices' shards and runs the same jitted programs, whose inputs process 0 sends.

Protocol: before each device operation process 0 publishes one message in the coordination service's key-value
store (``xyjax/op/<n>``, n counting from 0): a header ``[op, a, b]`` int32, then the operation's arrays as bytes.
STEP (a = the token bucket; the step's StepInputs and SamplingInputs, shaped as the planner's all-padding step of
that bucket), COPY (copy KV block a to b), MOVE (the ``[max_moves, 2]`` slot pairs), STOP (the others leave
``follow``). The others wait for message n, unpack it by the shapes the header implies and run the same program;
the programs' own collectives (gloo between CPU hosts) keep every process in step, so once a STEP has run on
process 0 every process has read the messages before it, and process 0 deletes them.

The control plane is plain RPC, not a collective: no process waits in a collective while process 0 is idle (gloo
reads time out), and a process that dies is noticed by the coordination service's heartbeat: the others stop with
its error after ``heartbeat_timeout`` seconds rather than wait forever. Every process must compile the very same
programs for their collectives to meet (see ``initialize``; the engine skips the persistent compilation cache here).
"""

from __future__ import annotations

import jax
import numpy as np
from jax._src import distributed as _state

STOP, STEP, COPY, MOVE = range(4)
_WAIT_MS = 60_000      # a follower's wait for the next message, repeated while the leader is idle


def initialize(coordinator: str, num_processes: int, process_id: int, heartbeat_timeout: int = 10) -> None:
    """Join the ``jax.distributed`` job at ``coordinator`` (host:port; process 0 serves it) as ``process_id`` of
    ``num_processes``, with gloo collectives between CPU devices. Must run before anything touches a device."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in [0, {num_processes}) (--num-processes {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Every process must compile the same program: its HLO carries the Python call stack that traced it, which
    # differs between process 0 (Leader.run) and the others (follow), and CPU collectives of programs that differ
    # there never meet (both processes wait in the first all-reduce forever). Only the innermost frame is kept.
    jax.config.update("jax_include_full_tracebacks_in_locations", False)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout, initialization_timeout=120,
                               shutdown_timeout_seconds=heartbeat_timeout)


def _key(n: int) -> str:
    return f"xyjax/op/{n}"


def _pack(op: int, a: int = 0, b: int = 0, tree=None) -> bytes:
    parts = [np.array([op, a, b], np.int32)] + [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    return b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


def _unpack(data: bytes, template):
    """The arrays of ``template`` (a pytree of numpy arrays) filled from ``data``, in order."""
    leaves, treedef = jax.tree.flatten(template)
    out, offset = [], 0
    for leaf in map(np.asarray, leaves):
        out.append(np.frombuffer(data, leaf.dtype, leaf.size, offset).reshape(leaf.shape))
        offset += leaf.nbytes
    if offset != len(data):
        raise RuntimeError(f"a message of {len(data)} bytes does not match its template ({offset} bytes)")
    return jax.tree.unflatten(treedef, out)


class Leader:
    """Process 0's runner: the ``Runner`` interface (run, copy_blocks, move_slots), each operation published to
    the other processes before it runs here."""

    def __init__(self, runner):
        self.runner = runner
        self._client = _state.global_state.client
        self._sent = self._synced = 0

    def _send(self, op: int, a: int = 0, b: int = 0, tree=None) -> None:
        self._client.key_value_set_bytes(_key(self._sent), _pack(op, a, b, tree))
        self._sent += 1

    def run(self, inputs, sampling):
        self._send(STEP, inputs.token_ids.shape[0], 0, (inputs, sampling))
        out = self.runner.run(inputs, sampling)
        for n in range(self._synced, self._sent):     # every process has run this step: all read its messages
            self._client.key_value_delete(_key(n))
        self._synced = self._sent
        return out

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for source, destination in pairs:
            self._send(COPY, source, destination)
            self.runner.copy_blocks([(source, destination)])

    def move_slots(self, moves: list[tuple[int, int]]) -> None:
        self._send(MOVE, tree=self.runner.move_pairs(moves))
        self.runner.move_slots(moves)

    def stop(self) -> None:
        """Release the other processes from ``follow`` (once, at shutdown)."""
        self._send(STOP)


def follow(engine) -> None:
    """Processes other than 0: run what process 0 sends on this process's shards until it says STOP."""
    runner, planner, client = engine.runner, engine.planner, _state.global_state.client
    for n in range(1 << 62):
        while True:
            try:
                data = client.blocking_key_value_get_bytes(_key(n), _WAIT_MS)
                break
            except Exception as e:  # the store's timeout (the leader is idle) or its failure
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise RuntimeError(f"process {jax.process_index()}: lost process 0 ({e})") from e
        op, a, b = np.frombuffer(data, np.int32, 3)
        body = data[12:]
        if op == STOP:
            return
        if op == STEP:
            runner.run(*_unpack(body, planner.empty(int(a))))
        elif op == COPY:
            runner.copy_blocks([(int(a), int(b))])
        elif op == MOVE:
            pairs = _unpack(body, runner.move_pairs([]))
            runner.move_slots([tuple(p) for p in pairs.tolist() if p[0] >= 0])
        else:
            raise RuntimeError(f"unknown operation {op} from process 0")
