# The two commands of the README. Both set everything up first (scripts/setup.sh).
.PHONY: setup annotate test bench

XVFB := $(shell [ -n "$$DISPLAY" ] || echo "xvfb-run -a -s '-screen 0 1600x1000x24'")

setup:
	bash scripts/setup.sh

# The main job: the napari annotator on a bundled sample image.
annotate: setup
	$(XVFB) .venv/bin/hrmedseg-annotate $(ARGS)

# The documentation first: a broken link, anchor, page or API reference fails the build (strict).
test: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict --quiet --site-dir site
	$(XVFB) .venv/bin/python -m pytest -ra $(PYTEST_ARGS)
