"""Run the `kvdist` command as a rank on a fake host, to emulate several nodes on one.

Usage (under mpiexec): fake_node.py KVDIST-ARGS...
  FAKE_NODES      number of fake hosts: rank r runs on "fakenode{r % FAKE_NODES}" (its
                  socket.gethostname), so host-identity checks see several hosts
  FAKE_IP         what every fake host name resolves to (socket.gethostbyname)
  FAKE_DROP_LOCAL when set, MPI_LOCALRANKID/MPI_LOCALNRANKS are removed, as srun
                  --mpi=pmi2 leaves them out

Pair it with MPICH's MPIR_CVAR_NUM_CLIQUES=FAKE_NODES, which splits MPI's node-local
groups the same way (round robin), so MPI's view of the nodes matches the fake hosts. The fakes only change what this process asks of `socket`; its ranks still meet
over this host's network.
"""

from __future__ import annotations

import os
import socket
import sys

rank = int(os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
host = f"fakenode{rank % int(os.environ.get('FAKE_NODES', '1'))}"
if os.environ.get("FAKE_DROP_LOCAL"):
    os.environ.pop("MPI_LOCALRANKID", None)
    os.environ.pop("MPI_LOCALNRANKS", None)
_resolve = socket.gethostbyname
socket.gethostname = lambda: host
socket.gethostbyname = lambda name: (
    os.environ.get("FAKE_IP", "127.0.0.1") if name.startswith("fakenode") else _resolve(name)
)

from kvdist.cli.main import main  # noqa: E402  (after the fakes, as kvdist reads them)

sys.exit(main(sys.argv[1:]))
