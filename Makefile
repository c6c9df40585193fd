SHELL := /bin/bash
# phaul: `make demo` sets everything up and migrates a demo workload between
# two local test hosts; `make test` runs unit and end-to-end tests (root).
GO      ?= go
BIN     := bin
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: all build criu test unit e2e soak bench fuzz demo vet clean sysctl

all: build

build:
	$(GO) build -o $(BIN)/phaul ./cmd/phaul
	cc -O2 -Wall -pthread -o $(BIN)/workload test/workload/workload.c

criu:
	bash deploy/install-criu.sh

vet:
	$(GO) vet ./...

# Unit tests first (fast), then the end-to-end suite with real CRIU,
# processes, namespaces and sockets.
test: criu vet
	$(GO) test -count=1 -timeout 20m $$($(GO) list ./... | grep -v /test$$)
	$(MAKE) --no-print-directory e2e

unit:
	$(GO) test -count=1 $$($(GO) list ./... | grep -v /test$$)

# The e2e log is long; on failure its end repeats why each failed test failed.
e2e:
	@mkdir -p $(BIN)
	set -o pipefail; $(GO) test -count=1 -timeout 40m -v ./test/ 2>&1 | tee $(BIN)/e2e.log || \
		{ rc=$$?; awk -f test/failures.awk $(BIN)/e2e.log; exit $$rc; }

# The issue's soak: 50 migrations on one pair of hosts must leave nothing.
soak:
	$(GO) test -count=1 -timeout 40m -v -run 'TestHostLeftovers' ./test/ -leftover-runs 50

# BenchmarkModes migrates 24 fresh workloads per iteration (4 GiB ones
# too), so it runs once; the rest three times. go test's default 10 min
# timeout is far too short for either.
bench:
	$(GO) test -run '^$$' -bench . -skip BenchmarkModes -benchtime 3x -timeout 3h ./...
	$(GO) test -run '^$$' -bench BenchmarkModes -benchtime 1x -timeout 2h ./test/

FUZZTIME ?= 20s
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime $(FUZZTIME) ./core/wire/
	$(GO) test -run '^$$' -fuzz FuzzReceive -fuzztime $(FUZZTIME) ./core/images/
	$(GO) test -run '^$$' -fuzz FuzzInventory -fuzztime $(FUZZTIME) ./core/images/
	$(GO) test -run '^$$' -fuzz FuzzRecords -fuzztime $(FUZZTIME) ./core/images/
	$(GO) test -run '^$$' -fuzz FuzzReadPagemap -fuzztime $(FUZZTIME) ./core/pagestore/
	$(GO) test -run '^$$' -fuzz 'FuzzReceive$$' -fuzztime $(FUZZTIME) ./pageserver/
	$(GO) test -run '^$$' -fuzz FuzzSession -fuzztime $(FUZZTIME) ./pageserver/
	$(GO) test -run '^$$' -fuzz FuzzClientReplies -fuzztime $(FUZZTIME) ./pageserver/
	$(GO) test -run '^$$' -fuzz FuzzHeader -fuzztime $(FUZZTIME) ./pageserver/
	$(GO) test -run '^$$' -fuzz FuzzServeFetch -fuzztime $(FUZZTIME) ./pageserver/
	$(GO) test -run '^$$' -fuzz FuzzFetchAnswers -fuzztime $(FUZZTIME) ./pageserver/
	$(GO) test -run '^$$' -fuzz FuzzParseStep -fuzztime $(FUZZTIME) ./test/testenv/
	$(GO) test -run '^$$' -fuzz FuzzParseTick -fuzztime $(FUZZTIME) ./test/testenv/
	$(GO) test -run '^$$' -fuzz FuzzNftDecode -fuzztime $(FUZZTIME) ./core/linux/
	$(GO) test -run '^$$' -fuzz FuzzDecodeUffdMsg -fuzztime $(FUZZTIME) ./core/linux/
	$(GO) test -run '^$$' -fuzz FuzzParseSmaps -fuzztime $(FUZZTIME) ./core/linux/
	$(GO) test -run '^$$' -fuzz FuzzRecordReader -fuzztime $(FUZZTIME) ./lazy/
	$(GO) test -run '^$$' -fuzz FuzzReadLazyVMAs -fuzztime $(FUZZTIME) ./lazy/
	$(GO) test -run '^$$' -fuzz FuzzReadStackPointer -fuzztime $(FUZZTIME) ./lazy/
	$(GO) test -run '^$$' -fuzz FuzzReadTaskCount -fuzztime $(FUZZTIME) ./lazy/
	$(GO) test -run '^$$' -fuzz FuzzRemoteSet -fuzztime $(FUZZTIME) ./phaul/
	$(GO) test -run '^$$' -fuzz FuzzLazyControl -fuzztime $(FUZZTIME) ./phaul/

# A host setting, the operator's choice: raises fs.pipe-max-size to 4 MiB
# (deploy/sysctl.d). Undo: bash deploy/install-sysctl.sh --undo.
sysctl:
	bash deploy/install-sysctl.sh

demo: criu build
	bash test/demo.sh

clean:
	rm -rf $(BIN)
