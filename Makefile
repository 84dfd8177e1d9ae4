# squall: plain GNU make. `make run` and `make test` are the two commands a new user needs;
# both install missing Debian packages first (scripts/install-deps.sh).

# Compile on every core unless the caller chose (-j1 still works); sub-makes share the jobs.
ifeq ($(MAKELEVEL),0)
ifeq ($(filter -j%,$(MAKEFLAGS)),)
MAKEFLAGS += -j$(shell nproc 2>/dev/null || echo 2)
endif
endif

CXX ?= g++
CC ?= gcc
SANITIZE ?=
PREFIX ?= /usr/local

comma := ,
ifeq ($(SANITIZE),)
BUILD := build
SAN_FLAGS :=
else
BUILD := build/san-$(subst $(comma),-,$(SANITIZE))
SAN_FLAGS := -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
endif
LLHTTP_DIR := /usr/share/llhttp
LLHTTP_INCLUDE := /usr/share/include/llhttp
PKGS := libuv spdlog fmt tomlplusplus libcurl sqlite3 libsystemd libcrypto

CPPFLAGS += -Ilib -I. -Itests/unit -I$(LLHTTP_INCLUDE) -MMD -MP
CXXFLAGS ?= -O2 -g
CXXFLAGS += -std=c++20 -Wall -Wextra -Werror -pthread $(SAN_FLAGS)
CFLAGS_LLHTTP := -O2 -g $(SAN_FLAGS)
LDFLAGS += -pthread $(SAN_FLAGS)

# pkg-config is asked only when something is compiled or linked, so `make deps` can run first.
pkg_cflags = $(shell pkg-config --cflags $(PKGS))
pkg_libs = $(shell pkg-config --libs $(PKGS))

LIB_SRCS := $(shell find lib -name '*.cpp' | sort)
LIB_OBJS := $(LIB_SRCS:%.cpp=$(BUILD)/%.o)
LLHTTP_OBJS := $(BUILD)/llhttp/llhttp.o $(BUILD)/llhttp/api.o $(BUILD)/llhttp/http.o
SERVER_SRCS := $(shell find server -name '*.cpp' | sort)
SERVER_OBJS := $(SERVER_SRCS:%.cpp=$(BUILD)/%.o)
UNIT_SRCS := $(shell find tests/unit -name '*.cpp' | sort)
UNIT_OBJS := $(UNIT_SRCS:%.cpp=$(BUILD)/%.o)
EXAMPLE_SRCS := $(shell find examples -name '*.cpp' | sort)
EXAMPLE_BINS := $(EXAMPLE_SRCS:examples/%.cpp=$(BUILD)/examples/%)

LIBSQUALL := $(BUILD)/libsquall.a
SQUALLD := $(BUILD)/squalld
UNIT_TESTS := $(BUILD)/unit_tests
PYTHON := /usr/bin/python3

.PHONY: all deps run test unit integration examples format format-check clean bench install \
	uninstall

all: $(SQUALLD) $(UNIT_TESTS) $(EXAMPLE_BINS)

deps:
	@sh scripts/install-deps.sh

# The recursive make runs after deps so that pkg-config finds the packages just installed.
run: deps
	@$(MAKE) --no-print-directory $(SQUALLD)
	./$(SQUALLD) --config config/squalld.toml

test: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory unit
	@$(MAKE) --no-print-directory integration

unit: $(UNIT_TESTS)
	./$(UNIT_TESTS)

integration: $(SQUALLD) $(EXAMPLE_BINS)
	SQUALLD=$(CURDIR)/$(SQUALLD) SEND_EMAIL=$(CURDIR)/$(BUILD)/examples/send_email $(PYTHON) -m pytest -q -p no:cacheprovider tests/integration

examples: $(EXAMPLE_BINS)

bench: deps $(SQUALLD)
	sh scripts/install-deps.sh --bench
	SQUALLD=$(CURDIR)/$(SQUALLD) bench/run.sh

$(BUILD)/llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LLHTTP) -I$(LLHTTP_INCLUDE) -c $< -o $@

$(BUILD)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(CXX) $(CPPFLAGS) $(pkg_cflags) $(CXXFLAGS) -c $< -o $@

$(LIBSQUALL): $(LIB_OBJS) $(LLHTTP_OBJS)
	@rm -f $@
	ar rcs $@ $^

$(SQUALLD): $(SERVER_OBJS) $(LIBSQUALL)
	$(CXX) $(LDFLAGS) -o $@ $^ $(pkg_libs)

$(UNIT_TESTS): $(UNIT_OBJS) $(LIBSQUALL)
	$(CXX) $(LDFLAGS) -o $@ $^ $(pkg_libs)

$(BUILD)/examples/%: $(BUILD)/examples/%.o $(LIBSQUALL)
	$(CXX) $(LDFLAGS) -o $@ $^ $(pkg_libs)

# `make install PREFIX=/usr/local DESTDIR=...`: the binary, the man page, the systemd units (with
# the binary's path in ExecStart), the logrotate snippet, and the config, which is installed only
# when none is there (an edited one is never overwritten). `make uninstall` removes them; the
# config only if it is still the shipped one.
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
LOGROTATEDIR ?= $(SYSCONFDIR)/logrotate.d

install: $(SQUALLD)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(UNITDIR) \
	  $(DESTDIR)$(LOGROTATEDIR) $(DESTDIR)$(SYSCONFDIR)/squall
	install -m 0755 $(SQUALLD) $(DESTDIR)$(BINDIR)/squalld
	install -m 0644 docs/squalld.8 $(DESTDIR)$(MANDIR)/man8/squalld.8
	sed -e 's|/usr/local/bin/squalld|$(BINDIR)/squalld|g' \
	  -e 's|/etc/squall/squalld.toml|$(SYSCONFDIR)/squall/squalld.toml|g' \
	  systemd/squalld.service > $(DESTDIR)$(UNITDIR)/squalld.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/squalld.service
	install -m 0644 systemd/squalld.socket $(DESTDIR)$(UNITDIR)/squalld.socket
	install -m 0644 config/logrotate $(DESTDIR)$(LOGROTATEDIR)/squalld
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml ]; then \
	  echo "keeping the existing $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml"; \
	else \
	  echo "install -m 0644 config/squalld.toml $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml"; \
	  install -m 0644 config/squalld.toml $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml; \
	fi
	@echo "installed; with systemd: systemctl daemon-reload && systemctl enable --now squalld"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/squalld $(DESTDIR)$(MANDIR)/man8/squalld.8 \
	  $(DESTDIR)$(UNITDIR)/squalld.service $(DESTDIR)$(UNITDIR)/squalld.socket \
	  $(DESTDIR)$(LOGROTATEDIR)/squalld
	@if cmp -s config/squalld.toml $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml; then \
	  rm -f $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml; \
	  rmdir $(DESTDIR)$(SYSCONFDIR)/squall 2>/dev/null || true; \
	elif [ -e $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml (edited); remove it by hand"; \
	fi

format:
	clang-format -i $(LIB_SRCS) $(SERVER_SRCS) $(UNIT_SRCS) $(EXAMPLE_SRCS) $(shell find lib server tests/unit examples -name '*.hpp')

format-check:
	clang-format --dry-run -Werror $(LIB_SRCS) $(SERVER_SRCS) $(UNIT_SRCS) $(EXAMPLE_SRCS) $(shell find lib server tests/unit examples -name '*.hpp')

clean:
	rm -rf build

-include $(LIB_OBJS:.o=.d) $(SERVER_OBJS:.o=.d) $(UNIT_OBJS:.o=.d) $(EXAMPLE_BINS:=.d)
