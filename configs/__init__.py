"""The YAML recipes medct ships (installed as `medct.configs`; `medct configs` lists them).

In a checkout they are the files of configs/; in an installed medct, package data of the wheel.
`medct.recipes` finds them by name: `medct fit --config seg_phantom`.
"""
