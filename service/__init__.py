"""blog.v1 gRPC service: users, posts and tags over SQLAlchemy 2 async."""
