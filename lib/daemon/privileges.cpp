#include "squall/daemon/privileges.hpp"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace squall::daemon {

namespace {

std::string reason(int err) {
  return err == 0 ? std::string("not found") : std::string(std::strerror(err));
}

}  // namespace

std::string drop_privileges(const std::string& user, const std::string& group) {
  if (user.empty()) return "";
  std::vector<char> buffer(16384);
  passwd account{};
  passwd* found_user = nullptr;
  int err = getpwnam_r(user.c_str(), &account, buffer.data(), buffer.size(), &found_user);
  if (found_user == nullptr) {
    throw std::runtime_error("[server] user \"" + user + "\": no such user (" + reason(err) + ")");
  }
  const uid_t uid = account.pw_uid;
  gid_t gid = account.pw_gid;
  std::string group_name;
  if (!group.empty()) {
    std::vector<char> group_buffer(16384);
    ::group entry{};
    ::group* found_group = nullptr;
    err = getgrnam_r(group.c_str(), &entry, group_buffer.data(), group_buffer.size(), &found_group);
    if (found_group == nullptr) {
      throw std::runtime_error("[server] group \"" + group + "\": no such group (" + reason(err) +
                               ")");
    }
    gid = entry.gr_gid;
    group_name = group;
  } else {
    ::group* primary = getgrgid(gid);
    group_name = primary != nullptr ? primary->gr_name : std::to_string(gid);
  }

  if (geteuid() == uid && getuid() == uid && getegid() == gid && getgid() == gid) return "";
  if (geteuid() != 0) {
    throw std::runtime_error("[server] user \"" + user +
                             "\": cannot switch to it: squalld runs as "
                             "uid " +
                             std::to_string(geteuid()) + ", not as root");
  }
  if (initgroups(user.c_str(), gid) != 0) {
    throw std::runtime_error("[server] user \"" + user + "\": initgroups: " + std::strerror(errno));
  }
  if (setgid(gid) != 0) {
    throw std::runtime_error("[server] group \"" + group_name + "\": setgid(" +
                             std::to_string(gid) + "): " + std::strerror(errno));
  }
  if (setuid(uid) != 0) {
    throw std::runtime_error("[server] user \"" + user + "\": setuid(" + std::to_string(uid) +
                             "): " + std::strerror(errno));
  }
  if (uid != 0 && (setuid(0) == 0 || seteuid(0) == 0)) {
    throw std::runtime_error("[server] user \"" + user +
                             "\": root privileges could be regained after setuid; refusing to run");
  }
  return "switched to user " + user + " (uid " + std::to_string(uid) + "), group " + group_name +
         " (gid " + std::to_string(gid) + ")";
}

}  // namespace squall::daemon
