"""The paper's experiments as TOML tables of `richkd-cache train` settings."""
