"""Entry script for stock mitmproxy tools:

    mitmdump -s addons/wakeproxy.py --set wakeproxy_config=config/wakeproxy.yaml
    mitmweb  -s addons/wakeproxy.py --set wakeproxy_config=config/wakeproxy.yaml

gives the same proxy as the `wakeproxy` command (same listeners, same routes),
with mitmweb's live view of every flow.

mitmproxy puts this file's folder first on sys.path while it loads the script.
The package lives next to it, in `addons/wakeproxy/`, and a package folder wins
over a module of the same name, so `import wakeproxy` finds the package: no
path handling here, and no module of ours shadows a library.
"""

from wakeproxy.bundle import make_addons

addons = make_addons()
