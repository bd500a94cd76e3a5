# An Alcove cluster on Nomad (docs/cluster.md, "Nomad"): the control plane
# (`alcove server --cluster-listen`) and one `alcove node` per Alcove client.
#
# Before `nomad job run -var server_url=https://... alcove.nomad.hcl`:
#   * the binaries `alcove` and `alcove-agent` side by side in /usr/local/bin on every client
#     that runs a group below (no published build: build them from the repository), and on the
#     node clients the packages of scripts/setup-host.sh (QEMU, nftables, ...);
#   * raw_exec enabled in the clients' configuration (plugin "raw_exec" { config { enabled = true } });
#   * client meta `alcove_control_plane = "true"` on the one client for the control plane and
#     `alcove_node = "true"` on each client that runs sandboxes;
#   * the cluster token in a Nomad variable that only this job reads:
#       nomad var put nomad/jobs/alcove cluster_token=$(head -c 32 /dev/urandom | xxd -p -c 64)
#   * a TLS terminator of your choice in front of the control plane's cluster port (7070, plain
#     HTTP), whose https:// URL is var.server_url: nodes accept plain http only to loopback.
#
# A Nomad job file holds one job, and a job has one type: the nodes are a service group with
# `distinct_hosts`, `node_count` instances, one per client. For one per client without a count,
# move the `node` group into a job of its own with `type = "system"` and drop its count.

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "server_url" {
  description = "The control plane's cluster listener as the nodes reach it: https:// through a TLS terminator."
  type        = string
  default     = "https://alcove-cluster.example.com"
}

variable "node_count" {
  description = "Clients with meta alcove_node = \"true\" to run a node on, one each."
  type        = number
  default     = 3
}

job "alcove" {
  datacenters = var.datacenters
  type        = "service"

  group "control-plane" {
    # ONE instance: the store is SQLite in --data-dir on this client's disk, and the cluster's
    # state (nodes, placement) lives in this one process. More instances need the Postgres
    # store (`--database-url`), each addressable by every node, and the key files shared
    # (docs/cluster.md); this job does not set that up.
    count = 1

    constraint {
      attribute = "${meta.alcove_control_plane}"
      value     = "true"
    }

    network {
      port "api" {
        static = 3000
      }
      port "cluster" {
        static = 7070
      }
    }

    service {
      name     = "alcove-api"
      port     = "api"
      provider = "nomad"

      check {
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    # For the TLS terminator only, never the public.
    service {
      name     = "alcove-cluster"
      port     = "cluster"
      provider = "nomad"
    }

    task "server" {
      # The control plane runs no VMs and needs no root; exec works as well where the data
      # directory belongs to the task's user.
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/alcove"
        args = [
          "server",
          "--listen", "0.0.0.0:${NOMAD_PORT_api}",
          "--cluster-listen", "0.0.0.0:${NOMAD_PORT_cluster}",
          "--data-dir", "/var/lib/alcove",
          "--cluster-token-file", "${NOMAD_SECRETS_DIR}/cluster.token",
        ]
      }

      env {
        ALCOVE_PLACEMENT = "spread"
      }

      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/alcove" }}{{ .cluster_token }}{{ end }}
        EOT
        destination = "secrets/cluster.token"
        perms       = "400"
        change_mode = "restart"
      }

      # The store: SQLite in --data-dir, unless the job's variable also holds `database_url`
      # (postgres://USER:PASSWORD@HOST/DATABASE?sslmode=require), given to the server as
      # ALCOVE_DATABASE_URL from this file of the task's secrets, never on its command line.
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/alcove" }}{{ if .database_url }}ALCOVE_DATABASE_URL={{ .database_url }}{{ end }}{{ end }}
        EOT
        destination = "secrets/database.env"
        env         = true
        perms       = "400"
        change_mode = "restart"
      }

      kill_timeout = "30s"

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "node" {
    count = var.node_count

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    constraint {
      attribute = "${meta.alcove_node}"
      value     = "true"
    }

    # A replaced node takes its running sandboxes with it: one at a time.
    update {
      max_parallel = 1
    }

    network {
      port "link" {
        static = 7071
      }
    }

    # The templates, built into the client's cache before the node starts (a cache hit takes
    # seconds, the first build tens of minutes). raw_exec: it boots VMs as root, like the node.
    task "templates" {
      driver = "raw_exec"

      lifecycle {
        hook    = "prestart"
        sidecar = false
      }

      config {
        command = "/bin/sh"
        args = [
          "-c",
          "/usr/local/bin/alcove template build base && /usr/local/bin/alcove template build code-interpreter-v1",
        ]
      }

      env {
        ALCOVE_DATA_DIR = "/var/lib/alcove-node"
        ALCOVE_CACHE    = "/var/cache/alcove"
      }

      resources {
        cpu    = 2000
        memory = 2048
      }
    }

    task "node" {
      # QEMU, KVM, network namespaces, nftables and cgroups: root on the client, hence raw_exec.
      driver = "raw_exec"

      config {
        command = "/usr/local/bin/alcove"
        args = [
          "node",
          "--server", var.server_url,
          "--token-file", "${NOMAD_SECRETS_DIR}/cluster.token",
          "--listen", "0.0.0.0:${NOMAD_PORT_link}",
          "--advertise", "https://${NOMAD_IP_link}:${NOMAD_PORT_link}",
          "--node-id", "${node.unique.name}",
        ]
      }

      env {
        ALCOVE_DATA_DIR    = "/var/lib/alcove-node"
        ALCOVE_CACHE       = "/var/cache/alcove"
        ALCOVE_REQUIRE_KVM = "true"
      }

      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/alcove" }}{{ .cluster_token }}{{ end }}
        EOT
        destination = "secrets/cluster.token"
        perms       = "400"
        change_mode = "restart"
      }

      # `alcove node` stops its warm pool's VMs on SIGTERM.
      kill_timeout = "60s"

      # The node's own share; the VMs' memory is outside it (each VM has its own cgroup).
      resources {
        cpu    = 1000
        memory = 2048
      }
    }
  }
}
