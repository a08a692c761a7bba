"""Knowledge: a tenant's own documents (files, folders, URLs), split into chunks that agents retrieve before they answer."""
