# The two commands a newcomer needs:
#   make run    build the bundled connectors and start ferry (embedded mode)
#   make test   install what the suite needs, then run all of it
# Everything they need is installed by scripts/setup.sh, idempotently.

.PHONY: run test connectors check

run:
	@scripts/run.sh

test:
	@scripts/test.sh

connectors:
	@scripts/build-connectors.sh

check:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
