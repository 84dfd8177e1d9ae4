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
# clang++ builds go to their own directory, so `make` (g++) and `make CXX=clang++` never mix
# objects; `make fuzz` builds the libFuzzer targets with clang into build/fuzz.
ifneq ($(findstring clang,$(notdir $(CXX))),)
BUILD_BASE := build/clang
else
BUILD_BASE := build
endif
ifeq ($(SANITIZE),)
BUILD := $(BUILD_BASE)
SAN_FLAGS :=
else
BUILD := $(BUILD_BASE)/san-$(subst $(comma),-,$(SANITIZE))
SAN_FLAGS := -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
endif
ifneq ($(FUZZ),)
BUILD := build/fuzz
SAN_FLAGS := -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer \
	-fno-sanitize-recover=all
endif
LLHTTP_DIR := /usr/share/llhttp
LLHTTP_INCLUDE := /usr/share/include/llhttp
PKGS := libuv spdlog fmt tomlplusplus libcurl sqlite3 libpq libsystemd libcrypto

CPPFLAGS += -Iinclude -Ilib -I. -Itests/unit -I$(LLHTTP_INCLUDE) -MMD -MP
CXXFLAGS ?= -O2 -g
CXXFLAGS += -std=c++20 -Wall -Wextra -Werror -pthread $(SAN_FLAGS)
CFLAGS_LLHTTP := -O2 -g $(SAN_FLAGS)
LDFLAGS += -pthread $(SAN_FLAGS)

# pkg-config is asked only when something is compiled or linked, so `make deps` can run first.
pkg_cflags = $(shell pkg-config --cflags $(PKGS))
pkg_libs = $(shell pkg-config --libs $(PKGS))

# The library is five, one per group of layers, so that a program links only what it uses:
#   squall         core, net, http server, log, metrics (+ llhttp)   libuv, spdlog, fmt
#   squall-client  the HTTP client (lib/http/client.cpp)             + libcurl
#   squall-jobs    the durable job queue: store (SQLite, PostgreSQL), store worker, runner
#                                                                    + sqlite3, libpq, libcrypto
#   squall-mail    email validation and MIME, SMTP, Maildir          + libcurl
#   squall-daemon  systemd, daemonizing, API tokens (lib/daemon, lib/auth) + libsystemd, libcrypto
# squalld's own configuration (TOML) lives with squalld in server/.
LIB_SRCS := $(shell find lib -name '*.cpp' | sort)
CLIENT_SRCS := $(filter lib/http/client.cpp,$(LIB_SRCS))
CORE_SRCS := $(filter-out $(CLIENT_SRCS),\
  $(filter lib/core/% lib/net/% lib/http/% lib/log/% lib/metrics/%,$(LIB_SRCS)))
JOBS_SRCS := $(filter lib/jobs/%,$(LIB_SRCS))
MAIL_SRCS := $(filter lib/mail/%,$(LIB_SRCS))
DAEMON_SRCS := $(filter-out $(CORE_SRCS) $(CLIENT_SRCS) $(JOBS_SRCS) $(MAIL_SRCS),$(LIB_SRCS))
LIB_OBJS := $(LIB_SRCS:%.cpp=$(BUILD)/%.o)
CORE_OBJS := $(CORE_SRCS:%.cpp=$(BUILD)/%.o)
CLIENT_OBJS := $(CLIENT_SRCS:%.cpp=$(BUILD)/%.o)
JOBS_OBJS := $(JOBS_SRCS:%.cpp=$(BUILD)/%.o)
MAIL_OBJS := $(MAIL_SRCS:%.cpp=$(BUILD)/%.o)
DAEMON_OBJS := $(DAEMON_SRCS:%.cpp=$(BUILD)/%.o)
LLHTTP_OBJS := $(BUILD)/llhttp/llhttp.o $(BUILD)/llhttp/api.o $(BUILD)/llhttp/http.o
CORE_PKGS := libuv spdlog fmt
CLIENT_PKGS := libcurl
JOBS_PKGS := sqlite3 libpq libcrypto
MAIL_PKGS := libcurl
DAEMON_PKGS := libsystemd libcrypto
VERSION := 0.1.0
SOVERSION := 0
SERVER_SRCS := $(shell find server -name '*.cpp' | sort)
SERVER_OBJS := $(SERVER_SRCS:%.cpp=$(BUILD)/%.o)
UNIT_SRCS := $(shell find tests/unit -name '*.cpp' | sort)
UNIT_OBJS := $(UNIT_SRCS:%.cpp=$(BUILD)/%.o)
EXAMPLE_SRCS := $(shell find examples -name '*.cpp' | sort)
EXAMPLE_BINS := $(EXAMPLE_SRCS:examples/%.cpp=$(BUILD)/examples/%)

LIBSQUALL := $(BUILD)/libsquall.a
LIBSQUALL_CLIENT := $(BUILD)/libsquall-client.a
LIBSQUALL_JOBS := $(BUILD)/libsquall-jobs.a
LIBSQUALL_MAIL := $(BUILD)/libsquall-mail.a
LIBSQUALL_DAEMON := $(BUILD)/libsquall-daemon.a
STATIC_LIBS := $(LIBSQUALL_DAEMON) $(LIBSQUALL_MAIL) $(LIBSQUALL_JOBS) $(LIBSQUALL_CLIENT) \
	$(LIBSQUALL)
SHARED_LIBS := $(BUILD)/libsquall.so.$(VERSION) $(BUILD)/libsquall-client.so.$(VERSION) \
	$(BUILD)/libsquall-jobs.so.$(VERSION) $(BUILD)/libsquall-mail.so.$(VERSION) \
	$(BUILD)/libsquall-daemon.so.$(VERSION)
SQUALLD := $(BUILD)/squalld
UNIT_TESTS := $(BUILD)/unit_tests
PYTHON := /usr/bin/python3

# libFuzzer targets (`make fuzz`, clang only): each links just the objects it exercises.
FUZZ_TARGETS := parser fast_head email config
FUZZ_BINS := $(FUZZ_TARGETS:%=$(BUILD)/%_fuzz)
FUZZ_OBJS_parser := $(BUILD)/lib/http/parser.o $(BUILD)/lib/http/fast_head.o $(BUILD)/lib/http/request.o $(LLHTTP_OBJS)
FUZZ_OBJS_fast_head := $(FUZZ_OBJS_parser)
FUZZ_OBJS_email := $(BUILD)/lib/mail/email.o
FUZZ_OBJS_config := $(BUILD)/server/config.o
# Seconds each target runs in `make test`; `make fuzz-run FUZZ_SECONDS=600` runs longer.
FUZZ_SECONDS ?= 10

.PHONY: all deps run test unit integration examples format format-check clean bench install \
	uninstall fuzz fuzz-targets fuzz-run install-squalld install-lib uninstall-squalld \
	uninstall-lib libs

all: $(SQUALLD) $(UNIT_TESTS) $(EXAMPLE_BINS) libs

libs: $(STATIC_LIBS) $(SHARED_LIBS)

deps:
	@sh scripts/install-deps.sh

# The recursive make runs after deps so that pkg-config finds the packages just installed.
# config/dev.toml is the shipped defaults with mail written to ./squall-mail (a Maildir).
run: deps
	@$(MAKE) --no-print-directory $(SQUALLD)
	./$(SQUALLD) --config config/dev.toml

test: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory unit
	@$(MAKE) --no-print-directory integration
	@$(MAKE) --no-print-directory fuzz-run

# The fuzz build is its own tree (build/fuzz), compiled by clang with libFuzzer, ASan and UBSan.
fuzz: deps
	@$(MAKE) --no-print-directory FUZZ=1 CXX=clang++ CC=clang fuzz-targets

fuzz-targets: $(FUZZ_BINS)

# Runs each target from its committed seeds (fuzz/corpus/<target>); what it finds new goes to
# build/fuzz/corpus/<target>, a crash to build/fuzz/crash-*, and the run fails.
fuzz-run: fuzz
	@for target in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz/corpus/$$target || exit 1; \
	  echo "fuzz: $$target for $(FUZZ_SECONDS)s"; \
	  ./build/fuzz/$${target}_fuzz -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=1024 \
	    -print_final_stats=1 -artifact_prefix=build/fuzz/$$target- \
	    build/fuzz/corpus/$$target fuzz/corpus/$$target 2>build/fuzz/$$target.log \
	    || { tail -n 60 build/fuzz/$$target.log; exit 1; }; \
	  grep -h -E '^stat::(number_of_executed_units|new_units_added)' build/fuzz/$$target.log; \
	done

# The unit and black-box tests of the PostgreSQL job store run against a private server that
# scripts/pg-test-server starts in a temporary directory (SQUALL_TEST_PG_URL) and stops after.
unit: $(UNIT_TESTS)
	sh scripts/pg-test-server run ./$(UNIT_TESTS)

integration: $(SQUALLD) $(EXAMPLE_BINS) libs
	sh scripts/pg-test-server run env SQUALLD=$(CURDIR)/$(SQUALLD) SANITIZE=$(SANITIZE) SEND_EMAIL=$(CURDIR)/$(BUILD)/examples/send_email EXAMPLES_DIR=$(CURDIR)/$(BUILD)/examples $(PYTHON) -m pytest -q -p no:cacheprovider tests/integration

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

# Library objects go into the shared libraries too. Calls inside a library stay direct.
$(BUILD)/lib/%.o: CXXFLAGS += -fPIC -fno-semantic-interposition
$(BUILD)/llhttp/%.o: CFLAGS_LLHTTP += -fPIC

$(LIBSQUALL): $(CORE_OBJS) $(LLHTTP_OBJS)
$(LIBSQUALL_CLIENT): $(CLIENT_OBJS)
$(LIBSQUALL_JOBS): $(JOBS_OBJS)
$(LIBSQUALL_MAIL): $(MAIL_OBJS)
$(LIBSQUALL_DAEMON): $(DAEMON_OBJS)
$(STATIC_LIBS):
	@rm -f $@
	ar rcs $@ $^

# libsquall.so.0 -> libsquall.so.0.1.0 (the soname), libsquall.so -> libsquall.so.0 (for -l).
# Each library records the ones it needs (NEEDED), the others by their soname.
define shared_library
$(BUILD)/lib$(1).so.$(VERSION): $(2)
	$$(CXX) -shared -Wl,-soname,lib$(1).so.$(SOVERSION) -Wl,--no-undefined $$(LDFLAGS) -o $$@ \
	  $(2) $$(shell pkg-config --libs $(3))
	ln -sf lib$(1).so.$(VERSION) $(BUILD)/lib$(1).so.$(SOVERSION)
	ln -sf lib$(1).so.$(SOVERSION) $(BUILD)/lib$(1).so
endef
$(eval $(call shared_library,squall,$(CORE_OBJS) $(LLHTTP_OBJS),$(CORE_PKGS)))
$(eval $(call shared_library,squall-client,$(CLIENT_OBJS) $(BUILD)/libsquall.so.$(VERSION),\
  $(CORE_PKGS) $(CLIENT_PKGS)))
$(eval $(call shared_library,squall-jobs,$(JOBS_OBJS) $(BUILD)/libsquall.so.$(VERSION),\
  $(CORE_PKGS) $(JOBS_PKGS)))
$(eval $(call shared_library,squall-mail,$(MAIL_OBJS) $(BUILD)/libsquall.so.$(VERSION),\
  $(CORE_PKGS) $(MAIL_PKGS)))
$(eval $(call shared_library,squall-daemon,$(DAEMON_OBJS) $(BUILD)/libsquall.so.$(VERSION),\
  $(CORE_PKGS) $(DAEMON_PKGS)))

$(SQUALLD): $(SERVER_OBJS) $(STATIC_LIBS)
	$(CXX) $(LDFLAGS) -o $@ $^ $(pkg_libs)

# The unit tests also cover squalld's configuration loader.
$(UNIT_TESTS): $(UNIT_OBJS) $(BUILD)/server/config.o $(STATIC_LIBS)
	$(CXX) $(LDFLAGS) -o $@ $^ $(pkg_libs)

$(BUILD)/examples/%: $(BUILD)/examples/%.o $(STATIC_LIBS)
	$(CXX) $(LDFLAGS) -o $@ $^ $(pkg_libs)

.SECONDEXPANSION:
$(BUILD)/%_fuzz: $(BUILD)/fuzz/%_fuzz.o $$(FUZZ_OBJS_$$*)
	$(CXX) $(LDFLAGS) -fsanitize=fuzzer -o $@ $^ $(pkg_libs)

# `make install PREFIX=/usr/local DESTDIR=...`: squalld and the library. For squalld: the binary,
# the man page, the systemd units (with
# the binary's path in ExecStart), the logrotate snippet, and the config, which is installed only
# when none is there (an edited one is never overwritten). `make uninstall` removes them; the
# config only if it is still the shipped one.
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
LOGROTATEDIR ?= $(SYSCONFDIR)/logrotate.d

install: install-squalld install-lib
uninstall: uninstall-squalld uninstall-lib

install-squalld: $(SQUALLD)
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

uninstall-squalld:
	rm -f $(DESTDIR)$(BINDIR)/squalld $(DESTDIR)$(MANDIR)/man8/squalld.8 \
	  $(DESTDIR)$(UNITDIR)/squalld.service $(DESTDIR)$(UNITDIR)/squalld.socket \
	  $(DESTDIR)$(LOGROTATEDIR)/squalld
	@if cmp -s config/squalld.toml $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml; then \
	  rm -f $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml; \
	  rmdir $(DESTDIR)$(SYSCONFDIR)/squall 2>/dev/null || true; \
	elif [ -e $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/squall/squalld.toml (edited); remove it by hand"; \
	fi

# The library: headers under include/squall, the static and shared libraries (with their
# soname links) and a pkg-config file per library, so that a program outside this tree builds
# with `c++ -std=c++20 app.cpp $(pkg-config --cflags --libs squall)`.
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
LIBRARY_NAMES := squall squall-client squall-jobs squall-mail squall-daemon

# $(1): name, $(2): description, $(3): the pkg-config packages it requires.
define pkg_config_file
prefix=$(PREFIX)
libdir=$(LIBDIR)
includedir=$(INCLUDEDIR)

Name: $(1)
Description: $(2)
Version: $(VERSION)
Requires: $(3)
Libs: -L$${libdir} -l$(1) -pthread
Cflags: -I$${includedir} -pthread
endef
export SQUALL_PC := $(call pkg_config_file,squall,Asynchronous TCP and HTTP/1.1 on one libuv \
  loop: tasks$(comma) timers$(comma) the thread pool$(comma) an HTTP server,$(CORE_PKGS))
export SQUALL_CLIENT_PC := $(call pkg_config_file,squall-client,squall's asynchronous HTTP \
  client (libcurl on the loop),squall $(CLIENT_PKGS))
export SQUALL_JOBS_PC := $(call pkg_config_file,squall-jobs,squall's durable job queue: store$(comma) \
  store worker$(comma) runner,squall $(JOBS_PKGS))
export SQUALL_MAIL_PC := $(call pkg_config_file,squall-mail,squall's email: validation$(comma) \
  MIME$(comma) SMTP and Maildir delivery,squall $(MAIL_PKGS))
export SQUALL_DAEMON_PC := $(call pkg_config_file,squall-daemon,squall's systemd$(comma) \
  daemon and API token helpers,squall $(DAEMON_PKGS))

install-lib: $(STATIC_LIBS) $(SHARED_LIBS)
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(INCLUDEDIR)
	cp -R include/squall $(DESTDIR)$(INCLUDEDIR)/
	find $(DESTDIR)$(INCLUDEDIR)/squall -type d -exec chmod 0755 {} + && \
	  find $(DESTDIR)$(INCLUDEDIR)/squall -type f -exec chmod 0644 {} +
	install -m 0644 $(STATIC_LIBS) $(DESTDIR)$(LIBDIR)/
	for name in $(LIBRARY_NAMES); do \
	  install -m 0755 $(BUILD)/lib$$name.so.$(VERSION) $(DESTDIR)$(LIBDIR)/ && \
	  ln -sf lib$$name.so.$(VERSION) $(DESTDIR)$(LIBDIR)/lib$$name.so.$(SOVERSION) && \
	  ln -sf lib$$name.so.$(SOVERSION) $(DESTDIR)$(LIBDIR)/lib$$name.so || exit 1; \
	done
	printf '%s\n' "$$SQUALL_PC" > $(DESTDIR)$(PKGCONFIGDIR)/squall.pc
	printf '%s\n' "$$SQUALL_CLIENT_PC" > $(DESTDIR)$(PKGCONFIGDIR)/squall-client.pc
	printf '%s\n' "$$SQUALL_JOBS_PC" > $(DESTDIR)$(PKGCONFIGDIR)/squall-jobs.pc
	printf '%s\n' "$$SQUALL_MAIL_PC" > $(DESTDIR)$(PKGCONFIGDIR)/squall-mail.pc
	printf '%s\n' "$$SQUALL_DAEMON_PC" > $(DESTDIR)$(PKGCONFIGDIR)/squall-daemon.pc
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" -eq 0 ]; then ldconfig; fi

uninstall-lib:
	rm -rf $(DESTDIR)$(INCLUDEDIR)/squall
	for name in $(LIBRARY_NAMES); do \
	  rm -f $(DESTDIR)$(LIBDIR)/lib$$name.a $(DESTDIR)$(LIBDIR)/lib$$name.so \
	    $(DESTDIR)$(LIBDIR)/lib$$name.so.$(SOVERSION) $(DESTDIR)$(LIBDIR)/lib$$name.so.$(VERSION) \
	    $(DESTDIR)$(PKGCONFIGDIR)/$$name.pc; \
	done
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" -eq 0 ]; then ldconfig; fi

format:
	clang-format -i $(LIB_SRCS) $(SERVER_SRCS) $(UNIT_SRCS) $(EXAMPLE_SRCS) $(wildcard fuzz/*.cpp) $(shell find include lib server tests/unit examples -name '*.hpp')

format-check:
	clang-format --dry-run -Werror $(LIB_SRCS) $(SERVER_SRCS) $(UNIT_SRCS) $(EXAMPLE_SRCS) $(wildcard fuzz/*.cpp) $(shell find include lib server tests/unit examples -name '*.hpp')

clean:
	rm -rf build

-include $(LIB_OBJS:.o=.d) $(SERVER_OBJS:.o=.d) $(UNIT_OBJS:.o=.d) $(EXAMPLE_BINS:=.d) \
	$(FUZZ_TARGETS:%=$(BUILD)/fuzz/%_fuzz.d)
