"""``losa-deploy env``."""

from __future__ import annotations

HELP = "show versions, compiled kernels, CPU features / CUDA arch, huge-page placement and the engines installed"


def add_arguments(parser) -> None:
    pass


def run(args) -> dict:
    from ..envinfo import environment

    env = environment()
    k, cpu, cuda = env["kernels"], env["cpu"], env["cuda"]
    print(f"losa-deploy {env['losa_deploy']}  python {env['python']}")
    print("packages:  " + "  ".join(f"{p} {v}" for p, v in env["packages"].items()))
    print(f"kernels:   {'compiled' if k['compiled'] else 'NOT compiled (' + str(k['error']) + ')'}"
          + (f"; ops: {', '.join(o.split('::')[1] for o in k['ops'])}" if k["ops"] else ""))
    feats = [f for f, ok in cpu["features"].items() if ok]
    print(f"cpu:       {cpu['model']} ({cpu['logical_cores']} logical cores, torch threads {env['torch_threads']})")
    print(f"features:  {' '.join(feats) or 'none of interest'}")
    print("cuda:      " + (f"{cuda['device']} {cuda['arch']}" if cuda["available"] else "not available"))
    print(f"memory:    packed CPU weights on {env['memory']['packed_weights']}")
    for name, e in env["engines"].items():
        state = e["version"] if e["installed"] else f"unusable ({e['error']})" if e.get("error") else "not installed"
        print(f"engine:    {name:<12} {state}")
    return env
