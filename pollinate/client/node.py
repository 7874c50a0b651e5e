"""The keys of a node's config (a SuperNode's ``--node-config``) that ``pollinate agent`` writes and the
ClientApp reads. A module of its own, importing nothing heavy: the agent, which only supervises a
SuperNode, must not load torch to know them.
"""

from __future__ import annotations

NODE_FIELDS = {"prompt-field": "prompt", "response-field": "response", "text-field": "text",
               "label-field": "label"}
"""Node-config keys naming a column of the device's data file -> the field of the run's ``data`` table."""
TLS_KEYS = ("certs", "node-name", "server-host")
"""Node-config keys of the device's own TLS identity (:class:`~pollinate.deploy.certs.DeviceTls`), set by
``pollinate agent``: its certificate folder (``ca.crt``, ``nodes/<name>/``), its name, and the host it
reaches the server by."""
