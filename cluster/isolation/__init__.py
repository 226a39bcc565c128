"""Network isolation for Ray on one machine: Ray binds its ports on every interface, so local
runs keep it inside private network namespaces and forward only the API port.

One concept per module:

* :mod:`.forwarder` -- :class:`LoopbackForwarder`: a host-side TCP listener piping each
  connection to a socket made inside a namespace.
* :mod:`.netns` -- :class:`NetNamespace`: create (loopback up), enter, list the processes of,
  and delete a named network namespace; :func:`veth_pair` joins two of them.
* :mod:`.procfs` -- reading ``/proc/<pid>/stat``, ``cmdline`` and ``environ``.
* :mod:`.process_group` -- stopping a child's process group in steps and killing what is left.
* :mod:`.ray_tmpdir` -- private, short ``RAY_TMPDIR`` folders and sweeping stale ones.
"""

from __future__ import annotations


class IsolationError(Exception):
    """Isolation could not be set up (port taken, no namespace): one line a user can act on."""
