#!/usr/bin/python3
"""Shows one domain's snapshot tree live, from vmsnapd's D-Bus API alone.

An example front end: it reads everything once through the ObjectManager at the root
(GetManagedObjects), then keeps its own copy up to date from signals only, never polling:
InterfacesAdded / InterfacesRemoved for snapshots and jobs that appear and go away, and
PropertiesChanged for the rest (current snapshot, parents and children, job progress).

    snapshot-tree.py [--address ADDR] DOMAIN            # redraws the tree on every change
    snapshot-tree.py [--address ADDR] DOMAIN --json     # one JSON line per change
    snapshot-tree.py ... --once | --events N            # stop after 1 / N renderings

Needs python3-dbus and python3-gi (Debian packages of the same names). Without --address it
uses the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured).
"""

import argparse
import json
import sys

import dbus
import dbus.mainloop.glib
from gi.repository import GLib

BUS_NAME = "org.vmsnap.VmSnap1"
ROOT = "/org/vmsnap/VmSnap1"
MANAGER = BUS_NAME + ".Manager"
DOMAIN = BUS_NAME + ".Domain"
SNAPSHOT = BUS_NAME + ".Snapshot"
JOB = BUS_NAME + ".Job"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
NONE = "/"


def plain(value):
    """dbus-python values as plain Python ones (for JSON)."""
    if isinstance(value, (dbus.Boolean,)):
        return bool(value)
    if isinstance(value, (dbus.Byte, dbus.Int16, dbus.Int32, dbus.Int64,
                          dbus.UInt16, dbus.UInt32, dbus.UInt64)):
        return int(value)
    if isinstance(value, dbus.Double):
        return float(value)
    if isinstance(value, (dbus.String, dbus.ObjectPath, dbus.Signature)):
        return str(value)
    if isinstance(value, (dbus.Array, list, dbus.Struct, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (dbus.Dictionary, dict)):
        return {str(k): plain(v) for k, v in value.items()}
    return value


class Model:
    """This front end's copy of the daemon's objects: path -> {interface -> properties}."""

    def __init__(self, domain_path):
        self.domain_path = domain_path
        self.objects = {}

    def add(self, path, interfaces):
        entry = self.objects.setdefault(str(path), {})
        for iface, props in interfaces.items():
            entry[str(iface)] = plain(props)

    def remove(self, path, interfaces):
        entry = self.objects.get(str(path))
        if entry is None:
            return
        for iface in interfaces:
            entry.pop(str(iface), None)
        if not entry:
            del self.objects[str(path)]

    def change(self, path, iface, changed):
        entry = self.objects.get(str(path))
        if entry is not None and str(iface) in entry:
            entry[str(iface)].update(plain(changed))

    def _mine(self, iface):
        return {p: o[iface] for p, o in self.objects.items()
                if iface in o and o[iface].get("Domain") == self.domain_path}

    def view(self):
        """The domain, its snapshot forest and its jobs, as plain data."""
        domain = self.objects.get(self.domain_path, {}).get(DOMAIN, {})
        snaps = self._mine(SNAPSHOT)

        def node(path):
            s = snaps[path]
            kids = [c for c in s.get("Children", []) if c in snaps]
            kids.sort(key=lambda c: (snaps[c].get("CreationTime", 0), c))
            return {
                "name": s.get("Name", ""),
                "state": s.get("State", ""),
                "kind": s.get("Kind", ""),
                "current": bool(s.get("IsCurrent", False)),
                "size_on_disk": s.get("SizeOnDisk", 0),
                "children": [node(c) for c in kids],
            }

        roots = [p for p, s in snaps.items() if s.get("Parent", NONE) not in snaps]
        roots.sort(key=lambda p: (snaps[p].get("CreationTime", 0), p))
        current = domain.get("CurrentSnapshot", NONE)
        jobs = [{"operation": j.get("Operation", ""), "phase": j.get("Phase", ""),
                 "progress": j.get("Progress", 0.0), "finished": j.get("Finished", False)}
                for _, j in sorted(self._mine(JOB).items())]
        return {
            "domain": domain.get("Name", ""),
            "state": domain.get("State", ""),
            "current": snaps.get(current, {}).get("Name"),
            "tree": [node(r) for r in roots],
            "jobs": jobs,
        }


def draw(view):
    """The view as text, the tree drawn like `vmsnap list --tree`."""
    lines = ["%s (%s)" % (view["domain"], view["state"])]

    def below(n, prefix):
        for i, c in enumerate(n["children"]):
            last = i == len(n["children"]) - 1
            lines.append(prefix + "  |")
            lines.append(prefix + "  +- " + label(c))
            below(c, prefix + ("     " if last else "  |  "))

    def label(n):
        return n["name"] + (" (current)" if n["current"] else "")

    for root in view["tree"]:
        lines.append(label(root))
        below(root, "")
    if not view["tree"]:
        lines.append("(no snapshots)")
    for j in view["jobs"]:
        if not j["finished"]:
            lines.append("job: %s %s %3.0f%%" % (j["operation"], j["phase"], 100 * j["progress"]))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("domain")
    ap.add_argument("--address", help="bus address (default: the system bus)")
    ap.add_argument("--json", action="store_true", help="one JSON line per rendering")
    ap.add_argument("--once", action="store_true", help="render once and exit")
    ap.add_argument("--events", type=int, default=0, metavar="N",
                    help="exit after N renderings (the first included)")
    args = ap.parse_args()

    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(args.address) if args.address else dbus.SystemBus()
    manager = dbus.Interface(bus.get_object(BUS_NAME, ROOT), MANAGER)
    try:
        domain_path = str(manager.FindDomain(args.domain))
    except dbus.DBusException as e:
        print("snapshot-tree: %s" % e.get_dbus_message(), file=sys.stderr)
        return 3
    model = Model(domain_path)
    loop = GLib.MainLoop()
    rendered = [0]
    pending = [False]

    def render():
        pending[0] = False
        view = model.view()
        if args.json:
            print(json.dumps(view, sort_keys=True), flush=True)
        else:
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(draw(view) + "\n", flush=True)
        rendered[0] += 1
        limit = 1 if args.once else args.events
        if limit and rendered[0] >= limit:
            loop.quit()
        return False

    def soon():
        # A burst of signals (one operation) becomes one rendering.
        if not pending[0]:
            pending[0] = True
            GLib.idle_add(render)

    def added(path, interfaces):
        model.add(path, interfaces)
        soon()

    def removed(path, interfaces):
        model.remove(path, interfaces)
        soon()

    def changed(iface, values, _invalidated, path=None):
        model.change(path, iface, values)
        soon()

    # Subscribe first, then read: nothing that happens in between is lost.
    bus.add_signal_receiver(added, "InterfacesAdded", OBJECT_MANAGER, BUS_NAME, ROOT)
    bus.add_signal_receiver(removed, "InterfacesRemoved", OBJECT_MANAGER, BUS_NAME, ROOT)
    bus.add_signal_receiver(changed, "PropertiesChanged", PROPERTIES, BUS_NAME,
                            path_keyword="path")
    objects = dbus.Interface(bus.get_object(BUS_NAME, ROOT), OBJECT_MANAGER).GetManagedObjects()
    for path, interfaces in objects.items():
        model.add(path, interfaces)
    render()
    if not (args.once or (args.events and rendered[0] >= args.events)):
        loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
