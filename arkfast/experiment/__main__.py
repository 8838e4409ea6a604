from .cli import run_cli

if __name__ == "__main__":  # not in spawned job workers, which import this module as __mp_main__
    run_cli()
