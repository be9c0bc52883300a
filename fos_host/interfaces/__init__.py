"""The contracts between processes, as typed interfaces (`fos_host.ipc.interface`).

Imported by the host, the renderers and the services alike; they import only `fos_host.ipc`,
so the untrusted side never imports host code.
"""
