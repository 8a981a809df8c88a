# The Hydra configs, installed as the package ``popstack.configs`` (data only: the YAML files beside this one).
