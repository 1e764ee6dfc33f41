"""`fewstep convert`: the command line of `fewstep.training.restore.convert_snapshot`."""

from __future__ import annotations

from fewstep.cli.common import command

EXAMPLES = """examples:
  fewstep convert edm-cifar10-32x32-uncond-vp.pkl --out teachers/edm-vp
  fewstep sample teachers/edm-vp --steps 18                  # or the .pkl itself, read again each time
  fewstep train --data cifar10 --method ect --teacher teachers/edm-vp

The snapshot (EDM, EDM2 or ECT) is unpickled with a closed list of globals: no code stored in it
runs. The folder holds safetensors weights and a JSON record (network, preconditioning, data shape,
EDM2's latent settings), so the pickle is read once.
"""


def add_parser(sub) -> None:
    p = command(sub, "convert", help="convert an EDM / EDM2 / ECT snapshot (.pkl) into a fewstep checkpoint folder",
                description="Read a paper's .pkl snapshot safely and write it as safetensors + JSON.",
                epilog=EXAMPLES)
    p.add_argument("snapshot", help="the .pkl file")
    p.add_argument("--out", required=True, help="the folder to write (its checkpoints/ holds the checkpoint)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fewstep.interop.edm_snapshot import SnapshotError
    from fewstep.training.restore import convert_snapshot

    if not str(args.snapshot).endswith(".pkl"):
        raise SnapshotError(f"{args.snapshot}: fewstep convert reads .pkl snapshots (EDM, EDM2, ECT)")
    path = convert_snapshot(args.snapshot, args.out)
    print(f"wrote {path}")
    return 0
